"""Decontamination: finding training documents that share a long word n-gram with evaluation text.

Words are lowercased runs of letters and digits (of any script), so case, punctuation and whitespace
cannot hide a copied passage. Hashing is deterministic, never Python's salted ``hash()``, so an index built
by the lead process means the same in every worker, and vectorised with numpy, so a document costs a few
dozen array operations whatever its length:

- a word's hash is a polynomial over its UTF-8 bytes modulo 2**64, scrambled by a mixing function;
- an n-gram's hash is a polynomial over its words' hashes.

Both polynomials come from prefix sums: with S(k) = sum_{m<=k} x(m) * B**m, the run x(i..j) has the
polynomial (S(j) - S(i-1)) * B**-i, and B, being odd, has an inverse modulo 2**64.

Evaluation texts shorter than ``n`` words (short questions, one-line answers) would otherwise never match.
A text of at least MIN_SHORT_WORDS words but fewer than ``n`` enters the index whole, and a training
document containing that exact word sequence matches; texts shorter still are left out, because a phrase
of a few words ("the capital of France") is common in honest training text.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmforge.errors import LmforgeError

MIN_SHORT_WORDS = 8
BYTE_BASE = 0x100000001B3  # the polynomial bases; odd, so they have inverses modulo 2**64
WORD_BASE = 0x9E3779B97F4A7C15
# A HashSet's flag table is sized so about 1 in 16 absent values needs the exact check, up to 2**MAX_TABLE_BITS
# flags (64 MB, 4M hashes at that precision; a larger set only checks more candidates exactly).
TABLE_SLOTS_PER_GRAM = 16
MAX_TABLE_BITS = 26
MAX_CHUNK = 1 << 20  # bytes, or words, hashed in one go: bounds the power tables and temporaries on huge texts
INDEX_FORMAT = 1
TEXT_SUFFIXES = (".txt", ".md", ".rst")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".csv", ".tsv", ".parquet")

# Splitting runs on UTF-8 bytes: ASCII letters and digits are word bytes, every other ASCII byte becomes a
# space, and bytes of non-ASCII characters stay (the punctuation among those characters is made a space first).
SEPARATORS_TO_SPACE = bytes(byte if chr(byte).isalnum() or byte >= 128 else ord(" ") for byte in range(256))
ASCII = frozenset(chr(code) for code in range(128))
SPACE = np.uint8(ord(" "))


def normalized_bytes(text: str) -> bytes:
    """The text lowercased, as UTF-8, with a single kind of separator (space) between words."""
    lowered = text.lower()
    if not lowered.isascii():
        for char in set(lowered) - ASCII:
            if not char.isalnum():
                lowered = lowered.replace(char, " ")
    return lowered.encode().translate(SEPARATORS_TO_SPACE)


def words_of(text: str) -> list[str]:
    return normalized_bytes(text).decode().split()


class Powers:
    """base**k and base**-k modulo 2**64 for k = 0, 1, ..., grown on demand."""

    def __init__(self, base: int):
        self.base, self.inverse = base, pow(base, -1, 1 << 64)
        self.up = self.down = np.ones(1, np.uint64)

    def __call__(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        if count > len(self.up):
            size = max(count, 2 * len(self.up), 1 << 14)
            self.up, self.down = power_series(self.base, size), power_series(self.inverse, size)
        return self.up[:count], self.down[:count]


def power_series(base: int, count: int) -> np.ndarray:
    factors = np.full(count, base, np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)  # wraps modulo 2**64, as intended


byte_powers, word_powers = Powers(BYTE_BASE), Powers(WORD_BASE)


def mix(values: np.ndarray) -> np.ndarray:
    """Scramble 64-bit values in place (SplitMix64's finaliser), so similar words get unrelated hashes."""
    values ^= values >> np.uint64(30)
    values *= np.uint64(0xBF58476D1CE4E5B9)
    values ^= values >> np.uint64(27)
    values *= np.uint64(0x94D049BB133111EB)
    values ^= values >> np.uint64(31)
    return values


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit hash of each word of ``text``, (number of words,) uint64."""
    data = normalized_bytes(text)
    pieces, start = [], 0
    while start < len(data):  # a piece at a time, cut between words, so memory stays bounded on huge texts
        end = data.find(b" ", start + MAX_CHUNK)
        end = len(data) if end < 0 else end
        pieces.append(piece_word_hashes(data[start:end]))
        start = end
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0] if pieces else np.empty(0, np.uint64)


def piece_word_hashes(data: bytes) -> np.ndarray:
    data = np.frombuffer(b" " + data, np.uint8)
    is_word = data != SPACE
    starts = np.flatnonzero(is_word[1:] > is_word[:-1]) + 1
    if not len(starts):
        return np.empty(0, np.uint64)
    up, down = byte_powers(len(data))
    values = data.astype(np.uint64)
    values += np.uint64(1)  # no byte counts as zero, so "a" and "a" followed by more bytes differ
    values *= is_word  # separators add nothing to the sum of the word before them
    values *= up
    return mix(np.add.reduceat(values, starts) * down[starts])


def gram_hashes(word_hash: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of ``n`` consecutive words, (len(word_hash) - n + 1,) uint64; empty if too few words."""
    count = len(word_hash) - n + 1
    if count <= 0:
        return np.empty(0, np.uint64)
    pieces = [piece_gram_hashes(word_hash[start:start + MAX_CHUNK + n - 1], n) for start in range(0, count, MAX_CHUNK)]
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def piece_gram_hashes(word_hash: np.ndarray, n: int) -> np.ndarray:
    count = len(word_hash) - n + 1
    up, down = word_powers(len(word_hash))
    prefix = np.cumsum(word_hash * up, dtype=np.uint64)
    runs = prefix[n - 1:].copy()
    runs[1:] -= prefix[:count - 1]
    return runs * down[:count]


class HashSet:
    """A set of 64-bit hashes: a sorted array, with a table of flags in front that answers "absent" for most
    values in one memory access (a binary search takes twenty)."""

    def __init__(self, hashes: np.ndarray | None = None):
        self._sorted = np.empty(0, np.uint64) if hashes is None else np.unique(hashes.astype(np.uint64))
        self._pending: list[np.ndarray] = []
        self._flags: np.ndarray | None = None  # built on first use
        self._shift = np.uint64(0)

    def add(self, hashes: np.ndarray) -> None:
        self._pending.append(hashes)

    def __len__(self) -> int:
        return len(self.sorted())

    def sorted(self) -> np.ndarray:
        """Every hash, sorted and unique."""
        if self._pending:
            self._sorted = np.unique(np.concatenate([self._sorted, *self._pending]))
            self._pending = []
            self._flags = None
        return self._sorted

    def positions(self, values: np.ndarray) -> np.ndarray:
        """The positions in ``values`` of the values in the set, in order."""
        hashes = self.sorted()
        if not len(hashes) or not len(values):
            return np.empty(0, np.intp)
        maybe = np.flatnonzero(self.flags()[values >> self._shift])
        if not len(maybe):
            return maybe
        candidates = values[maybe]
        return maybe[hashes[np.minimum(np.searchsorted(hashes, candidates), len(hashes) - 1)] == candidates]

    def flags(self) -> np.ndarray:
        """One flag per value of a hash's top bits: False means no hash in the set has those bits."""
        if self._flags is None:
            hashes = self.sorted()
            bits = max(16, min(MAX_TABLE_BITS, (len(hashes) * TABLE_SLOTS_PER_GRAM).bit_length()))
            self._shift = np.uint64(64 - bits)
            self._flags = np.zeros(1 << bits, bool)
            self._flags[hashes >> self._shift] = True
        return self._flags


class NGramIndex:
    """Hashed word n-grams of evaluation text; tells whether a training document shares any with it."""

    def __init__(self, n: int = 13):
        if n < 1:
            raise LmforgeError(f"n-gram length must be at least 1, got {n}")
        self.n = n
        self.grams = HashSet()  # n-grams, and the whole of each short text
        # Short texts are found through their first MIN_SHORT_WORDS words, so a document costs one extra pass
        # however many lengths the short texts have; only a hit there checks the whole text.
        self.short_starts = HashSet()
        self.short_lengths: set[int] = set()

    def add(self, text: str) -> None:
        word_hash = word_hashes(text)
        if len(word_hash) >= self.n:
            self.grams.add(gram_hashes(word_hash, self.n))
        elif len(word_hash) >= MIN_SHORT_WORDS:
            self.grams.add(gram_hashes(word_hash, len(word_hash)))
            self.short_starts.add(gram_hashes(word_hash[:MIN_SHORT_WORDS], MIN_SHORT_WORDS))
            self.short_lengths.add(len(word_hash))

    def __len__(self) -> int:
        """The number of distinct n-grams (and whole short texts)."""
        return len(self.grams)

    def match(self, text: str) -> str | None:
        """The first shared n-gram (as words joined by spaces) or None."""
        if not len(self.grams):
            return None
        word_hash = word_hashes(text)
        found = [(int(position), self.n) for position in self.grams.positions(gram_hashes(word_hash, self.n))[:1]]
        if self.short_lengths:
            found += self.first_short_text(word_hash)
        if not found:
            return None
        position, length = min(found, key=lambda hit: (hit[0], -hit[1]))  # the earliest, then the longest
        return " ".join(words_of(text)[position:position + length])

    def first_short_text(self, word_hash: np.ndarray) -> list[tuple[int, int]]:
        """[(position, length)] of the first whole short text in the document, or []."""
        for position in self.short_starts.positions(gram_hashes(word_hash, MIN_SHORT_WORDS)):
            for length in sorted(self.short_lengths, reverse=True):
                whole = gram_hashes(word_hash[position:position + length], length)
                if len(self.grams.positions(whole)):
                    return [(int(position), length)]
        return []

    def save(self, path: Path) -> None:
        """Write the index as one .npz file (8 bytes per n-gram), for worker processes to load."""
        with open(path, "wb") as handle:
            np.savez(handle, format=np.int64(INDEX_FORMAT), n=np.int64(self.n), grams=self.grams.sorted(),
                     short_starts=self.short_starts.sorted(),
                     short_lengths=np.array(sorted(self.short_lengths), np.int64))

    @classmethod
    def load(cls, path: Path) -> "NGramIndex":
        try:
            with np.load(path) as saved:
                if (found := int(saved["format"])) != INDEX_FORMAT:
                    raise LmforgeError(f"n-gram index {path} has format {found}, expected {INDEX_FORMAT}")
                index = cls(int(saved["n"]))
                index.grams = HashSet(saved["grams"])
                index.short_starts = HashSet(saved["short_starts"])
                index.short_lengths = {int(length) for length in saved["short_lengths"]}
        except LmforgeError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise LmforgeError(f"cannot read the n-gram index {path}: {error}") from None
        return index


def build_index(eval_files: list[str], field: str, n: int) -> NGramIndex:
    """An index of every evaluation text in ``eval_files`` (files, or folders read recursively).

    .txt/.md/.rst files count whole; each .jsonl line and each record of a .json file gives its ``field``, or
    every string value in it when it has no such field; .csv/.tsv/.parquet give their ``field`` column.
    Anything missing or unreadable raises LmforgeError naming the file.
    """
    index = NGramIndex(n)
    for name in eval_files:
        for path in eval_paths(Path(name)):
            texts = 0
            for text in read_eval_texts(path, field):
                index.add(text)
                texts += 1
            if not texts:
                raise LmforgeError(f"evaluation file {path} holds no text")
    return index


def eval_paths(path: Path) -> list[Path]:
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and format_suffix(p) in SUFFIXES)
        if not paths:
            raise LmforgeError(f"evaluation folder {path} holds no {'/'.join(SUFFIXES)} files")
        return paths
    if not path.exists():
        raise LmforgeError(f"evaluation file {path} does not exist")
    if format_suffix(path) not in SUFFIXES:
        raise LmforgeError(f"evaluation file {path} is not one of {', '.join(SUFFIXES)} (optionally .gz or .zst)")
    return [path]


def format_suffix(path: Path) -> str:
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def read_eval_texts(path: Path, field: str) -> Iterator[str]:
    suffix = format_suffix(path)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if field not in table.column_names:
                columns = ", ".join(table.column_names)
                raise LmforgeError(f"evaluation file {path} has no column {field!r} (it has {columns})")
            yield from (text for text in table.column(field).to_pylist() if isinstance(text, str))
            return
        content = read_text(path)
        if suffix in TEXT_SUFFIXES:
            if content.strip():
                yield content
        elif suffix == ".jsonl":
            for line_number, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    yield from record_texts(parse_json(line, f"{path}:{line_number}"), field)
        elif suffix == ".json":
            records = parse_json(content, str(path))
            for record in records if isinstance(records, list) else [records]:
                yield from record_texts(record, field)
        else:
            rows = csv.DictReader(io.StringIO(content), delimiter="\t" if suffix == ".tsv" else ",")
            if field not in (rows.fieldnames or []):
                raise LmforgeError(f"evaluation file {path} has no column {field!r}")
            yield from (row[field] for row in rows if row[field])
    except LmforgeError:
        raise
    except (OSError, UnicodeDecodeError, EOFError, ValueError) as error:
        raise LmforgeError(f"cannot read evaluation file {path}: {error}") from None


def read_text(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".zst"):
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as reader:
            data = reader.read()
    else:
        data = path.read_bytes()
    return data.decode("utf-8")


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LmforgeError(f"{where}: not valid JSON ({error.msg})") from None


def record_texts(record: Any, field: str) -> Iterator[str]:
    """The record's ``field`` if it is a string, else every string inside it."""
    if isinstance(record, dict) and isinstance(record.get(field), str):
        yield record[field]
    elif isinstance(record, str):
        yield record
    elif isinstance(record, dict):
        for value in record.values():
            yield from record_texts(value, field)
    elif isinstance(record, list):
        for value in record:
            yield from record_texts(value, field)
