"""Language identification with py3langid's packaged model (no download), computed with numpy.

py3langid walks its byte automaton one byte at a time in Python (~5 MB/s). The automaton only remembers the
last few bytes (its deepest state spells DEPTH bytes), so the state after each byte is also the state reached by
walking the DEPTH bytes that end there from the start state. Doing those DEPTH steps for all positions at once
with numpy gives the same features and scores, about four times faster.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from lmforge.config import LanguageConfig
from lmforge.errors import LmforgeError

# Characters judged per document; the cost per document is bounded, and a paragraph is plenty for the model.
MAX_CHARS = 2000
# The longest byte string a state of py3langid's automaton spells (tests/test_data_filters.py checks the model).
DEPTH = 6
LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Model:
    """py3langid's naive Bayes model, laid out for vectorised scoring."""

    next_state: np.ndarray  # (distinct rows x 256,) the state after each (row, byte)
    row_start: np.ndarray  # (states,) where each state's row of 256 transitions starts in next_state
    feature: np.ndarray  # (states,) the feature a state emits; `len(weights) - 1` (an all-zero row) for none
    weights: np.ndarray  # (features + 1, languages) float32 log-probabilities of a feature per language
    prior: np.ndarray  # (languages,) float32 log-prior
    languages: tuple[str, ...]
    aliases: tuple[tuple[int, int], ...]  # (first, duplicate) columns of one label (py3langid's script variants)


@functools.cache
def model() -> Model:
    """Load the packaged model once per process (~0.6 s)."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE
    from py3langid.modelio import load_model

    weights, prior, languages, next_state, rows, outputs = load_model(MODEL_DIR / MODEL_FILE)
    feature = np.asarray(outputs, dtype=np.int32)  # int32 sorts twice as fast as int64
    feature[feature < 0] = len(weights)
    weights = np.vstack([np.asarray(weights, dtype=np.float32), np.zeros((1, weights.shape[1]), np.float32)])
    first: dict[str, int] = {}
    aliases = []
    for index, label in enumerate(languages):
        if label in first:
            aliases.append((first[label], index))
        else:
            first[label] = index
    return Model(np.frombuffer(next_state, dtype=np.uint32 if next_state.itemsize == 4 else np.uint16),
                 np.frombuffer(rows, dtype=np.uint16 if rows.itemsize == 2 else np.uint32).astype(np.int64) << 8,
                 feature, weights, np.asarray(prior, dtype=np.float32), tuple(languages), tuple(aliases))


def language_probabilities(data: bytes, m: Model) -> np.ndarray:
    """py3langid's normalised probabilities (one column per model class) for UTF-8 bytes."""
    codes = np.frombuffer(data, dtype=np.uint8)
    length = len(codes)
    states = np.zeros(length, dtype=np.int64)
    # After the step for offset k, states[i] is the state reached by walking bytes i-k .. i from the start.
    for k in range(min(DEPTH, length) - 1, -1, -1):
        states[k:] = m.next_state.take(m.row_start.take(states[k:]) + codes[: length - k])
    features = m.feature.take(states)
    features.sort()
    if features[0] == len(m.weights) - 1:
        # No feature at all: py3langid abstains with equal scores for every class (the prior is left out too).
        return fold_aliases(np.full(len(m.prior), 1 / len(m.prior), dtype=np.float32), m)
    run_bounds = np.empty(length + 1, dtype=bool)  # where each run of one feature starts, and the end
    run_bounds[0] = run_bounds[-1] = True
    np.not_equal(features[1:], features[:-1], out=run_bounds[1:-1])
    bounds = run_bounds.nonzero()[0]
    counts = np.diff(bounds).astype(np.float32)
    scores = np.log1p(counts) @ m.weights.take(features[bounds[:-1]], axis=0) + m.prior
    # py3langid divides by sqrt(bytes) before the softmax so the confidence means the same at every length.
    scores *= 1.0 / math.sqrt(length)
    np.exp(scores - scores.max(), out=scores)
    scores /= scores.sum()
    return fold_aliases(scores, m)


def fold_aliases(probabilities: np.ndarray, m: Model) -> np.ndarray:
    """Add each duplicate column of a label into its first column, as py3langid does."""
    for first, duplicate in m.aliases:
        probabilities[first] += probabilities[duplicate]
        probabilities[duplicate] = 0.0
    return probabilities


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability in [0, 1]) from py3langid's packaged model (normalised probabilities), judged on
    at most the first MAX_CHARS characters so the cost per document is bounded; ("und", 0.0) for text without
    letters. A few of the model's languages have only an ISO 639-3 code (e.g. "arz", "yue")."""
    sample = text[:MAX_CHARS]
    if not LETTER.search(sample):
        return "und", 0.0
    # The same preparation as py3langid, so the scores match it.
    if sample.isupper():
        sample = sample.lower()
    if not unicodedata.is_normalized("NFC", sample):
        sample = unicodedata.normalize("NFC", sample)
    m = model()
    probabilities = language_probabilities(sample.encode("utf-8", errors="surrogatepass"), m)
    best = int(probabilities.argmax())
    return m.languages[best], float(probabilities[best])


class LanguageFilter:
    """Keeps documents in the recipe's languages whose language is clear enough."""

    def __init__(self, config: LanguageConfig):
        unknown = sorted(set(config.keep) - set(model().languages))
        if unknown:
            raise LmforgeError(f"language.keep: unknown language code(s) {', '.join(unknown)}; "
                               f"the model knows {', '.join(sorted(set(model().languages)))}")
        self.keep = frozenset(config.keep)
        self.min_score = config.min_score

    def __call__(self, text: str) -> tuple[str | None, str, float]:
        """(rejection reason or None, language, score). Reasons: "language_not_kept" (language not in config.keep;
        empty keep keeps all), "language_uncertain" (score < min_score)."""
        language, score = identify_language(text)
        if self.keep and language not in self.keep:
            return "language_not_kept", language, score
        if score < self.min_score:
            return "language_uncertain", language, score
        return None, language, score
