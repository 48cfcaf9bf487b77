"""A word-list filter for unwanted content: lmforge's packaged English list plus the user's own lists.

Words are runs of word characters (`\\w+`), compared in lower case; a listed phrase is a run of such words, so an
entry never matches inside a longer word ("Scunthorpe") and punctuation between words does not matter.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

from lmforge.config import ToxicityConfig
from lmforge.errors import LmforgeError

WORD = re.compile(r"\w+")
# For ASCII text, turning every non-word character into a space and splitting gives the same words as WORD,
# three times faster.
ASCII_NON_WORD_TO_SPACE = str.maketrans({char: " " for char in map(chr, range(128))
                                         if char not in string.ascii_letters + string.digits + "_"})


def words_of(lowered: str) -> list[str]:
    if lowered.isascii():
        return lowered.translate(ASCII_NON_WORD_TO_SPACE).split()
    return WORD.findall(lowered)


def packaged_list_text() -> str:
    return resources.files("lmforge.data").joinpath("wordlists/toxic_en.txt").read_text(encoding="utf-8")


def read_word_list(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise LmforgeError(f"toxicity.word_lists: cannot read word list {path}: {reason}") from None


class WordListFilter:
    """Rejects documents in which listed words or phrases are too frequent."""

    def __init__(self, config: ToxicityConfig):
        texts = [read_word_list(path) for path in config.word_lists]
        if config.packaged_list:
            texts.append(packaged_list_text())
        self.words: set[str] = set()
        phrases: set[str] = set()
        for text in texts:
            for line in text.splitlines():
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                words = words_of(entry.lower())
                if len(words) == 1:
                    self.words.add(words[0])
                elif words:
                    phrases.add(" ".join(words))
        # Phrases are looked for only in documents holding a phrase's first word, in the document's words joined
        # by single spaces.
        self.phrase_first_words = {phrase.split(" ", 1)[0] for phrase in phrases}
        alternatives = "|".join(map(re.escape, sorted(phrases, key=len, reverse=True)))  # longest first
        self.phrases = re.compile(rf"(?<!\S)(?:{alternatives})(?!\S)") if phrases else None
        self.max_fraction = config.max_fraction
        self.max_hits = config.max_hits

    def __call__(self, text: str) -> tuple[str | None, int]:
        """(rejection reason "toxic" or None, number of listed words/phrases found). Whole-word, case-insensitive
        match; rejects when hits/words > max_fraction or (max_hits is not None and hits > max_hits). A listed word
        inside a listed phrase counts for both."""
        words = words_of(text.lower())
        if not words:
            return None, 0
        hits = sum(map(words.count, self.words.intersection(words)))
        if self.phrases is not None and not self.phrase_first_words.isdisjoint(words):
            hits += len(self.phrases.findall(" ".join(words)))
        if hits / len(words) > self.max_fraction or (self.max_hits is not None and hits > self.max_hits):
            return "toxic", hits
        return None, hits
