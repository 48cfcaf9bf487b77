"""Language identification with py3langid's packaged model (no download), computed with numpy.

py3langid walks its byte automaton one byte at a time in Python (~5 MB/s). The automaton only remembers the
last few bytes (its deepest state spells DEPTH bytes), so the state after each byte is also the state reached by
walking the DEPTH bytes that end there from the start state. Doing those DEPTH steps for all positions at once
with numpy gives the same features and scores. Several documents can share one walk over their joined bytes:
only the first DEPTH - 1 positions of each document need a walk of their own, shorter than DEPTH.
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
    """py3langid's naive Bayes model, laid out for vectorised walking and scoring.

    A state is represented by where its row of 256 transitions starts (its *offset*), so one gather per byte
    walks the automaton; the last byte of a walk gathers the feature its target state emits instead."""

    start: int  # the start state's offset
    after_two_bytes: np.ndarray  # (65536,) uint32 offset after walking two bytes (big-endian pair) from the start
    next_offset: np.ndarray  # (distinct rows x 256,) uint32 offset of the state after each (offset + byte)
    next_feature: np.ndarray  # (distinct rows x 256,) int32 feature the state after (offset + byte) emits
    no_feature: int  # the feature index of states that emit none: an all-zero row of weights
    weights: np.ndarray  # (features + 1, languages) float32 log-probabilities of a feature per language
    prior: np.ndarray  # (languages,) float32 log-prior
    languages: tuple[str, ...]
    aliases: tuple[tuple[int, int], ...]  # (first, duplicate) columns of one label (py3langid's script variants)


@functools.cache
def model() -> Model:
    """Load the packaged model once per process (~1 s)."""
    from py3langid.langid import MODEL_DIR, MODEL_FILE
    from py3langid.modelio import load_model

    weights, prior, languages, next_state, rows, outputs = load_model(MODEL_DIR / MODEL_FILE)
    next_state = np.frombuffer(next_state, dtype=np.uint32 if next_state.itemsize == 4 else np.uint16)
    row_start = np.frombuffer(rows, dtype=np.uint16 if rows.itemsize == 2 else np.uint32).astype(np.uint32) << 8
    feature = np.asarray(outputs, dtype=np.int32)  # int32 sorts twice as fast as int64
    feature[feature < 0] = len(weights)
    next_offset = row_start.take(next_state)
    start = int(row_start[0])
    after_one_byte = next_offset[start:start + 256].astype(np.int64)
    after_two_bytes = next_offset.take((after_one_byte[:, None] + np.arange(256)).ravel())
    weights = np.vstack([np.asarray(weights, dtype=np.float32), np.zeros((1, weights.shape[1]), np.float32)])
    first: dict[str, int] = {}
    aliases = []
    for index, label in enumerate(languages):
        if label in first:
            aliases.append((first[label], index))
        else:
            first[label] = index
    return Model(start, after_two_bytes, next_offset, feature.take(next_state), len(weights) - 1, weights,
                 np.asarray(prior, dtype=np.float32), tuple(languages), tuple(aliases))


def walk_features(data: bytes, starts: np.ndarray, m: Model) -> np.ndarray:
    """(len(data),) int32: the feature emitted after each byte, walking each document from its start offset in
    `data` (documents are back to back; a walk never crosses into the next one)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    length = len(codes)
    features = np.empty(length, dtype=np.int32)
    if length >= DEPTH:
        # Each position's state is the walk over the DEPTH bytes ending there: two bytes at once from a small
        # table (the byte pairs, read in place as big-endian uint16), then one gather per byte.
        pairs = np.ndarray((length - 1,), dtype=">u2", buffer=data, strides=(1,))
        offsets = m.after_two_bytes.take(pairs[:length - DEPTH + 1])
        for k in range(2, DEPTH - 1):
            offsets += codes[k:length - DEPTH + 1 + k]
            offsets = m.next_offset.take(offsets)
        offsets += codes[DEPTH - 1:]
        features[DEPTH - 1:] = m.next_feature.take(offsets)
    # The first DEPTH - 1 positions of each document: a walk from its start, all documents a step at a time
    # (byte by byte in Python for a single document, where numpy's cost per call would dominate).
    if len(starts) == 1:
        offset = m.start
        for position in range(min(DEPTH - 1, length)):
            at = offset + data[position]
            features[position] = m.next_feature[at]
            offset = int(m.next_offset[at])
        return features
    ends = np.append(starts[1:], length)
    offsets = np.full(len(starts), m.start, dtype=np.int64)
    for k in range(DEPTH - 1):
        inside = (ends - starts > k).nonzero()[0]
        if not len(inside):
            break
        positions = starts[inside] + k
        at = offsets[inside] + codes[positions]
        features[positions] = m.next_feature.take(at)
        offsets[inside] = m.next_offset.take(at)
    return features


def probabilities_from_features(features: np.ndarray, m: Model) -> np.ndarray:
    """py3langid's normalised probabilities (one column per model class) from one document's features."""
    features.sort()
    if features[0] == m.no_feature:
        # No feature at all: py3langid abstains with equal scores for every class (the prior is left out too).
        return fold_aliases(np.full(len(m.prior), 1 / len(m.prior), dtype=np.float32), m)
    length = len(features)
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


def language_probabilities(data: bytes, m: Model) -> np.ndarray:
    """py3langid's normalised probabilities (one column per model class) for UTF-8 bytes."""
    return probabilities_from_features(walk_features(data, np.zeros(1, dtype=np.int64), m), m)


def fold_aliases(probabilities: np.ndarray, m: Model) -> np.ndarray:
    """Add each duplicate column of a label into its first column, as py3langid does."""
    for first, duplicate in m.aliases:
        probabilities[first] += probabilities[duplicate]
        probabilities[duplicate] = 0.0
    return probabilities


def prepared_sample(text: str) -> bytes | None:
    """The UTF-8 bytes py3langid would judge (first MAX_CHARS characters, prepared as py3langid does), or None for
    text without letters."""
    sample = text[:MAX_CHARS]
    if not LETTER.search(sample):
        return None
    if sample.isupper():
        sample = sample.lower()
    if not unicodedata.is_normalized("NFC", sample):
        sample = unicodedata.normalize("NFC", sample)
    return sample.encode("utf-8", errors="surrogatepass")


def best_language(probabilities: np.ndarray, m: Model) -> tuple[str, float]:
    best = int(probabilities.argmax())
    return m.languages[best], float(probabilities[best])


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability in [0, 1]) from py3langid's packaged model (normalised probabilities), judged on
    at most the first MAX_CHARS characters so the cost per document is bounded; ("und", 0.0) for text without
    letters. A few of the model's languages have only an ISO 639-3 code (e.g. "arz", "yue")."""
    data = prepared_sample(text)
    if data is None:
        return "und", 0.0
    m = model()
    return best_language(language_probabilities(data, m), m)


def identify_languages(texts: list[str]) -> list[tuple[str, float]]:
    """identify_language of each text, with one automaton walk and one sort for all of them (faster on batches)."""
    m = model()
    samples = [prepared_sample(text) for text in texts]
    judged = [sample for sample in samples if sample is not None]
    if not judged:
        return [("und", 0.0)] * len(texts)
    lengths = np.fromiter(map(len, judged), dtype=np.int64, count=len(judged))
    starts = np.concatenate(([0], lengths.cumsum()[:-1]))
    features = walk_features(b"".join(judged), starts, m)
    # One sort of (document, feature) keys groups each document's features into runs, as the per-document sort does.
    stride = m.no_feature + 1
    key_type = np.int32 if len(judged) * stride < 2**31 else np.int64  # int32 sorts faster
    keys = features.astype(key_type) + np.repeat(np.arange(len(judged), dtype=key_type) * stride, lengths)
    keys.sort()
    run_starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    counts = np.log1p(np.diff(np.append(run_starts, len(keys))).astype(np.float32))
    run_documents, run_features = np.divmod(keys[run_starts], stride)
    bounds = np.searchsorted(run_documents, np.arange(len(judged) + 1)).tolist()
    scores = np.empty((len(judged), len(m.prior)), dtype=np.float32)
    for document, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        # The same product, in the same order, as probabilities_from_features, so the scores are the same.
        scores[document] = counts[begin:end] @ m.weights.take(run_features[begin:end], axis=0)
    scores += m.prior
    scores *= (1.0 / np.sqrt(lengths)).astype(np.float32)[:, None]
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    # A document whose first run is "no feature" has none at all: py3langid abstains with equal scores.
    scores[run_features[bounds[:-1]] == m.no_feature] = 1 / len(m.prior)
    for first, duplicate in m.aliases:
        scores[:, first] += scores[:, duplicate]
        scores[:, duplicate] = 0.0
    best = scores.argmax(axis=1)
    results = iter(zip([m.languages[index] for index in best.tolist()], scores[np.arange(len(best)), best].tolist()))
    return [("und", 0.0) if sample is None else next(results) for sample in samples]


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
        return self.judge(language, score), language, score

    def batch(self, texts: list[str]) -> list[tuple[str | None, str, float]]:
        """What calling the filter on each text returns, identified in one batch (identify_languages)."""
        return [(self.judge(language, score), language, score) for language, score in identify_languages(texts)]

    def judge(self, language: str, score: float) -> str | None:
        if self.keep and language not in self.keep:
            return "language_not_kept"
        if score < self.min_score:
            return "language_uncertain"
        return None
