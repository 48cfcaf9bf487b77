"""Document quality heuristics: C4 line filters (Raffel et al. 2020) and Gopher rules (Rae et al. 2021).

A *word* is a whitespace-separated token (what `str.split()` returns). Its length, for the mean word length,
leaves out punctuation and symbols (Unicode categories P* and S*); repetition rules measure whole tokens. Words
are hashed once into 64-bit integers with numpy and n-grams are hashed from those with integer arithmetic, so the
repetition rules cost a few array operations per n rather than Python tuples.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from lmforge.config import QualityConfig
from lmforge.errors import LmforgeError

SPACE, LETTER, PUNCTUATION = 1, 2, 4
BULLETS = ("•", "‣", "◦", "⁃", "∙", "·", "●", "○", "■", "□", "▪", "▫", "➢", "►", "-", "*", "–", "—")
ELLIPSES = ("...", "…")
STOP_WORDS = re.compile(r"\b(?:the|be|to|of|and|that|have|with)\b", re.IGNORECASE)
# C4's policy notices, found anywhere in a line.
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# C4 drops every line that says "javascript"; our corpora discuss the language, so only lines asking for it go.
JAVASCRIPT_NOTICE = re.compile(r"enabl|disabl|turn on|browser|requir|support")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "”", "'", "’")
# Odd multipliers for the polynomial hashes of words (over characters) and n-grams (over word hashes).
CHAR_MULTIPLIER = 0x9E3779B97F4A7C15
CHAR_MULTIPLIER_INVERSE = pow(CHAR_MULTIPLIER, -1, 1 << 64)
WORD_MULTIPLIER = np.uint64(0xC2B2AE3D27D4EB4F)
LOW_16_BITS = np.uint64(0xFFFF)


def char_class(char: str) -> int:
    category = unicodedata.category(char)
    punctuation = PUNCTUATION if category[0] in "PS" else 0
    return (SPACE if char.isspace() else 0) | (LETTER if char.isalpha() else 0) | punctuation


@functools.cache
def bmp_classes() -> np.ndarray:
    """(65536,) uint8: the class bits of every character of the Basic Multilingual Plane (~30 ms, once)."""
    return np.array([char_class(chr(code)) for code in range(0x10000)], dtype=np.uint8)


@functools.cache
def ascii_classes() -> np.ndarray:
    """The first 128 entries of bmp_classes, small enough to stay in the fastest cache."""
    return bmp_classes()[:128].copy()


class Powers:
    """Powers of the character multiplier and of its inverse modulo 2**64, grown as longer texts arrive."""

    def __init__(self):
        self.forward = self.inverse = np.ones(0, dtype=np.uint64)

    def get(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.forward) < length:
            size = max(length, 2 * len(self.forward), 4096)
            # cumprod starts at the first power; multiplying by the inverse brings it back to the zeroth.
            forward = np.cumprod(np.full(size, CHAR_MULTIPLIER, dtype=np.uint64))
            inverse = np.cumprod(np.full(size, CHAR_MULTIPLIER_INVERSE, dtype=np.uint64))
            self.forward = forward * np.uint64(CHAR_MULTIPLIER_INVERSE)
            self.inverse = inverse * np.uint64(CHAR_MULTIPLIER)
        return self.forward[:length], self.inverse[:length]


POWERS = Powers()


@dataclass
class Words:
    count: int
    lengths: np.ndarray  # (count,) characters per word
    hashes: np.ndarray  # (count,) uint64, equal for equal words
    punctuation: int  # punctuation and symbol characters in all words
    with_letters: int  # words holding at least one letter


def analyse_words(text: str) -> Words:
    """Split `text` into whitespace-separated words and measure them, vectorised over characters."""
    if text.isascii():
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        classes = ascii_classes().take(codes)
    else:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        classes = bmp_classes().take(np.minimum(codes, 0xFFFF))
        for index in (codes > 0xFFFF).nonzero()[0]:
            classes[index] = char_class(chr(codes[index]))
    padded = np.zeros(len(codes) + 2, dtype=np.int8)  # 1 inside a word, 0 in spaces and beyond both ends
    padded[1:-1] = (classes & SPACE) == 0
    edges = padded[1:] - padded[:-1]
    starts, ends = (edges == 1).nonzero()[0], (edges == -1).nonzero()[0]
    # hash(word) = sum(code[i] * q**i): a prefix sum of code[j] * q**j, shifted back by q**-start per word.
    q_powers, q_inverse_powers = POWERS.get(len(codes))
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * q_powers, out=prefix[1:])
    hashes = (prefix[ends] - prefix[starts]) * q_inverse_powers[starts]
    # Each segment from one word's start to the next holds that word and the spaces after it.
    with_letters = np.count_nonzero(np.logical_or.reduceat((classes & LETTER) != 0, starts)) if len(starts) else 0
    return Words(len(starts), ends - starts, hashes, int(np.count_nonzero(classes & PUNCTUATION)), int(with_letters))


def next_ngram_hashes(ngrams: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the n-grams from those of the (n-1)-grams at the same start."""
    return ngrams[:-1] * WORD_MULTIPLIER + words[n - 1:]


def run_lengths(ordered: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in a sorted array."""
    return np.diff(np.concatenate(([True], ordered[1:] != ordered[:-1], [True])).nonzero()[0])


def top_ngram_characters(ngrams: np.ndarray, ngram_chars: np.ndarray) -> int:
    """Characters covered by the commonest repeated n-gram, counting each occurrence (0 when none repeats)."""
    # Equal n-grams have equal lengths, so the length can replace the hash's low 16 bits: sorting then groups each
    # n-gram's occurrences with its length in hand, with no argsort.
    keys = np.sort((ngrams & ~LOW_16_BITS) | np.minimum(ngram_chars, 0xFFFF).astype(np.uint64))
    run_starts = np.concatenate(([True], keys[1:] != keys[:-1], [True])).nonzero()[0]
    counts = np.diff(run_starts)
    top = int(counts.max())
    if top < 2:
        return 0
    return top * int((keys[run_starts[:-1][counts == top]] & LOW_16_BITS).max())


def repeated(values: np.ndarray) -> np.ndarray:
    """Mask of the values that occur more than once."""
    ordered = np.sort(values)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeats):
        return np.zeros(len(values), dtype=bool)
    return repeats[np.searchsorted(repeats, values).clip(max=len(repeats) - 1)] == values


class QualityFilter:
    """The recipe's `quality` section: C4 line filters, then Gopher document and repetition rules."""

    def __init__(self, config: QualityConfig):
        if len(config.max_top_ngram_fraction) != 3:
            raise LmforgeError("quality.max_top_ngram_fraction needs 3 values (n = 2, 3, 4), "
                               f"got {config.max_top_ngram_fraction}")
        if len(config.max_duplicate_ngram_fraction) != 6:
            raise LmforgeError("quality.max_duplicate_ngram_fraction needs 6 values (n = 5 to 10), "
                               f"got {config.max_duplicate_ngram_fraction}")
        self.config = config

    def __call__(self, text: str, language: str | None = None) -> tuple[str, str | None, int]:
        """(text with C4 boilerplate lines removed, rejection reason or None, lines removed). Word-based rules run on
        the text after line filtering; the stop-word rule applies only when language is None or "en"."""
        config, removed = self.config, 0
        if config.c4_boilerplate_lines or config.c4_terminal_punctuation:
            lowered = text.lower()
            if config.c4_boilerplate_lines and "lorem ipsum" in lowered:
                return text, "quality_lorem_ipsum", 0
            text, removed = self.filter_lines(text, lowered)
            if not text:
                return text, "quality_empty_after_line_filters", removed
        return text, self.rejection_reason(text, language), removed

    def filter_lines(self, text: str, lowered: str) -> tuple[str, int]:
        """C4's line filters: the text without boilerplate (and, if asked, unpunctuated) lines; lines removed."""
        config = self.config
        # Every policy phrase holds "cookie", "privacy policy" or "terms of use"; one scan each rules most texts out.
        boilerplate = config.c4_boilerplate_lines and (
            "javascript" in lowered or "cookie" in lowered or "privacy policy" in lowered or "terms of use" in lowered)
        if not boilerplate and not config.c4_terminal_punctuation:
            return text, 0
        kept, removed = [], 0
        for line, lowered_line in zip(text.split("\n"), lowered.split("\n")):
            if line and (
                (boilerplate and (("javascript" in lowered_line and JAVASCRIPT_NOTICE.search(lowered_line))
                                  or any(phrase in lowered_line for phrase in POLICY_PHRASES)))
                or (config.c4_terminal_punctuation and not line.endswith(TERMINAL_PUNCTUATION))
            ):
                removed += 1
            else:
                kept.append(line)
        if not removed:
            return text, 0
        # A removed line between two paragraphs would leave a wider gap than cleaning allows elsewhere.
        return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n"), removed

    def rejection_reason(self, text: str, language: str | None) -> str | None:
        """The first Gopher rule the text breaks, cheap rules first, or None."""
        config = self.config
        words = analyse_words(text)
        if words.count < config.min_words or words.count == 0:
            return "quality_too_few_words"
        if words.count > config.max_words:
            return "quality_too_many_words"
        characters = int(words.lengths.sum())
        mean_length = (characters - words.punctuation) / words.count
        if not config.min_mean_word_length <= mean_length <= config.max_mean_word_length:
            return "quality_mean_word_length"
        ascii_only = text.isascii()
        ellipses = text.count("...") + (0 if ascii_only else text.count("…"))
        if max(text.count("#"), ellipses) / words.count > config.max_symbol_word_ratio:
            return "quality_symbol_ratio"
        lines = [line for line in text.split("\n") if line and not line.isspace()]
        # Lines carry no trailing spaces (clean_text), so a line ends in an ellipsis where one meets a newline.
        ellipsis_lines = text.count("...\n") + (0 if ascii_only else text.count("…\n")) + text.endswith(ELLIPSES)
        if ellipsis_lines / len(lines) > config.max_ellipsis_line_fraction:
            return "quality_ellipsis_lines"
        if self.mostly_bullets(lines):
            return "quality_bullet_lines"
        if words.with_letters / words.count < config.min_alpha_word_fraction:
            return "quality_alpha_words"
        if config.min_stop_words and language in (None, "en") and not self.has_stop_words(text):
            return "quality_stop_words"
        if (len(lines) - len(set(lines))) / len(lines) > config.max_duplicate_line_fraction:
            return "quality_duplicate_lines"
        paragraphs = [paragraph.strip("\n") for paragraph in text.split("\n\n") if paragraph.strip("\n")]
        if (len(paragraphs) - len(set(paragraphs))) / len(paragraphs) > config.max_duplicate_paragraph_fraction:
            return "quality_duplicate_paragraphs"
        return self.repetition_reason(words, characters)

    def mostly_bullets(self, lines: list[str]) -> bool:
        """Whether more than max_bullet_line_fraction of the lines start with a bullet; prose settles it within its
        first few lines."""
        most = self.config.max_bullet_line_fraction * len(lines)
        bulleted = len(lines)  # until a line shows otherwise
        for line in lines:
            if not line.lstrip().startswith(BULLETS):
                bulleted -= 1
                if bulleted <= most:
                    return False
        return bulleted > most

    def has_stop_words(self, text: str) -> bool:
        found = 0
        for _ in STOP_WORDS.finditer(text):
            found += 1
            if found >= self.config.min_stop_words:
                return True
        return False

    def repetition_reason(self, words: Words, characters: int) -> str | None:
        """Gopher's n-gram rules: the commonest 2-, 3- and 4-gram, then all repeated 5- to 10-grams, as fractions
        of the characters in words."""
        ngrams, top_bigram_count = words.hashes, 0
        longest_word = int(words.lengths.max())
        for n, limit in zip((2, 3, 4), self.config.max_top_ngram_fraction):
            if words.count < n:
                return None
            ngrams = next_ngram_hashes(ngrams, words.hashes, n)
            if n == 2:
                top_bigram_count = int(run_lengths(np.sort(ngrams)).max())
            # Each occurrence of an n-gram starts with a bigram, so no n-gram is commoner than the commonest bigram:
            # this bound (with n-grams no longer than n of the longest word) settles most documents without
            # measuring any n-gram.
            if top_bigram_count * n * longest_word <= limit * characters:
                continue
            word_chars_before = np.concatenate(([0], words.lengths.cumsum()))
            ngram_chars = word_chars_before[n:] - word_chars_before[:-n]
            if top_bigram_count * ngram_chars.max() <= limit * characters:
                continue
            if top_ngram_characters(ngrams, ngram_chars) > limit * characters:
                return f"quality_top_{n}gram"
        limits = self.config.max_duplicate_ngram_fraction
        is_repeated = None
        for index, n in enumerate(range(5, 11)):
            if words.count < n:
                return None
            ngrams = next_ngram_hashes(ngrams, words.hashes, n)
            if is_repeated is None:
                is_repeated = repeated(ngrams)
            else:
                # An n-gram can only repeat where both (n-1)-grams inside it repeat.
                candidates = (is_repeated[:-1] & is_repeated[1:]).nonzero()[0]
                is_repeated = np.zeros(len(ngrams), dtype=bool)
                is_repeated[candidates[repeated(ngrams[candidates])]] = True
            starts = is_repeated.nonzero()[0]
            if not len(starts):
                return None
            # Words covered by a repeated n-gram: +1 where one starts, -1 where it ends, running sum > 0.
            depth = np.zeros(words.count + 1, dtype=np.int32)
            depth[starts] += 1
            depth[starts + n] -= 1
            covered_chars = words.lengths[depth[:-1].cumsum() > 0].sum()
            if covered_chars > limits[index] * characters:
                return f"quality_duplicate_{n}gram"
            # Longer repeated n-grams cover only words that shorter ones cover, so their fractions cannot be larger.
            if covered_chars <= min(limits[index:]) * characters:
                return None
        return None
