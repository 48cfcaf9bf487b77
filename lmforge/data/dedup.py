"""Exact and near-duplicate detection: normalised-text keys, MinHash signatures and LSH clustering.

Worker processes compute ``exact_key(text)`` and ``MinHasher(...)(text)`` per document (or, faster,
``exact_keys(texts)`` and ``MinHasher(...).batch(texts)`` per batch of documents); a merge step
loads every document's signature, in a fixed global order, and calls ``cluster_near_duplicates``
once. Each duplicate cluster keeps exactly one document, its smallest index, so the outcome does
not depend on how the corpus was split among workers.

Near duplicates: a document's words (casefolded ``\\w+`` tokens: "Straße" is "strasse") form
shingles of ``shingle_words`` consecutive words, and the signature holds, for each of ``num_perm``
hash functions, the smallest hash over the shingles. Two signatures agree in a position with
probability equal to the Jaccard similarity of the shingle sets. LSH cuts the signature into
``bands`` bands of ``rows`` values; documents that agree on a whole band become candidates, and a
candidate pair whose signatures agree in at least ``threshold`` of their positions is a duplicate.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable, Sequence

import numpy as np

from lmforge.errors import LmforgeError

EMPTY_VALUE = np.uint32(0xFFFFFFFF)  # every position of the signature of a text without words

# A bucket needs a new round for each group of mutually dissimilar members in it. Many groups share a whole band
# only when many unrelated documents share part of a signature (boilerplate); past this many rounds a bucket's rest
# is left to the other bands, so the work per band stays linear in the number of candidates.
MAX_PIVOT_ROUNDS = 32

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _ascii_table(keep: bytes) -> bytes:
    """A bytes.translate table: ASCII letters lowercased, digits and `keep` kept, other ASCII bytes a space, bytes of
    non-ASCII characters (>= 0x80) kept."""
    table = bytearray(b" " * 128 + bytes(range(128, 256)))
    for byte in b"abcdefghijklmnopqrstuvwxyz0123456789" + keep:
        table[byte] = byte
    for byte in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        table[byte] = byte + 32
    return bytes(table)


_ALNUM_TABLE = _ascii_table(b"")
_WORD_TABLE = _ascii_table(b"_")


def _separate(text: str, table: bytes, pattern: re.Pattern) -> bytes:
    """The text's UTF-8 bytes with every character that `pattern` does not match turned into a space (ASCII letters
    lowercased). Same result as a regular expression over the text, several times faster: a byte table does the ASCII
    characters, and a replace each the few distinct non-ASCII ones."""
    data = text.encode("utf-8", "surrogatepass").translate(table)
    if not text.isascii():
        for char in set("".join(_NON_ASCII.findall(text))):
            if not pattern.fullmatch(char):
                data = data.replace(char.encode("utf-8", "surrogatepass"), b" ")
    return data


def _separate_batch(texts: Sequence[str], table: bytes, pattern: re.Pattern) -> tuple[bytes, np.ndarray]:
    """`_separate` of each casefolded text, joined by a space, and the (len(texts) + 1,) int64 byte offsets where each
    text starts (the last is the end). The non-ASCII characters of the whole batch are found with numpy, so a batch
    costs one translate and a few array passes instead of several small passes per text."""
    pieces = [(text if text.isascii() else text.casefold()).encode("utf-8", "surrogatepass") for text in texts]
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)) + 1, out=offsets[1:])  # each is followed by a space
    data = b"".join(piece + b" " for piece in pieces).translate(table)
    leads = np.flatnonzero(np.frombuffer(data, np.uint8) >= 0xC0)  # the first byte of each non-ASCII character
    if not leads.size:
        return data, offsets
    array = np.frombuffer(data + b"\0\0\0", np.uint8).copy()
    lengths = 2 + (array[leads] >= 0xE0) + (array[leads] >= 0xF0)
    codes = np.zeros(leads.size, np.uint32)  # a character's UTF-8 bytes, big-endian, zero-filled to four
    for k in range(4):
        codes |= np.where(lengths > k, array[leads + k], 0).astype(np.uint32) << np.uint32(24 - 8 * k)
    distinct, which = np.unique(codes, return_inverse=True)
    blank = np.array([not pattern.fullmatch(int(code).to_bytes(4, "big").rstrip(b"\0").decode("utf-8", "surrogatepass"))
                      for code in distinct])[which]
    for k in range(4):
        array[leads[blank & (lengths > k)] + k] = 32  # one space per byte: offsets stay valid, words do not change
    return array[:-3].tobytes(), offsets


_ALNUM = re.compile(r"[^\W_]")
_WORD_CHAR = re.compile(r"\w")


def exact_key(text: str) -> bytes:
    """16-byte digest of the text with case folded and punctuation, symbols and whitespace reduced to
    single separators: "Hello,  World!" and "hello world" get the same key."""
    folded = b" ".join(_separate(text if text.isascii() else text.casefold(), _ALNUM_TABLE, _ALNUM).split())
    return hashlib.blake2b(folded, digest_size=16).digest()


def exact_keys(texts: Sequence[str]) -> list[bytes]:
    """`exact_key` of each text, faster for many short texts."""
    if not texts:
        return []
    data, offsets = _separate_batch(texts, _ALNUM_TABLE, _ALNUM)
    array = np.frombuffer(data, np.uint8)
    # Keep a space only after a non-space: every text's words then stand one space apart, each text with words ends
    # in one space (its own or the one after it), and a text without words keeps nothing.
    keep = np.ones(array.size, bool)
    keep[0] = array[0] != 32
    np.logical_or(array[1:] != 32, array[:-1] != 32, out=keep[1:])
    starts = np.concatenate(([0], np.cumsum(keep)))[offsets].tolist()
    folded = memoryview(array[keep].tobytes())
    return [hashlib.blake2b(folded[start:max(start, end - 1)], digest_size=16).digest()
            for start, end in zip(starts[:-1], starts[1:])]


_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64 in, uint64 out)."""
    x = x ^ (x >> _U64(30))
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _powers(base: int, count: int) -> np.ndarray:
    """(count,) uint64: base**0 .. base**(count-1) modulo 2**64."""
    powers = np.ones(count, np.uint64)
    np.cumprod(np.full(count - 1, base, np.uint64), out=powers[1:])  # numpy integer products wrap modulo 2**64
    return powers


class MinHasher:
    """MinHash signatures of word shingles, computed with numpy (no Python loop over words).

    Each word is hashed once to 64 bits with a polynomial hash over its UTF-8 bytes (one prefix sum
    over the whole text), a shingle's hash combines its words' hashes, and the ``num_perm`` hash
    functions ``(a * x + b) mod 2**32`` (a odd) are applied to all shingles in one broadcast. A text
    with fewer words than a shingle is one shingle of all its words; a text without words gets the
    signature of all ``0xFFFFFFFF``, which ``cluster_near_duplicates`` never links to anything.
    """

    # Texts are hashed in pieces of at most this many bytes (cut at a space), so the tables of powers
    # stay small; a word's hash does not depend on where it sits, so pieces change nothing.
    PIECE_BYTES = 1 << 16
    # Shingles go through the num_perm hash functions in blocks of this many (a 4 MB buffer at 128).
    SHINGLE_BLOCK = 8192

    def __init__(self, num_perm: int = 128, shingle_words: int = 5, seed: int = 0):
        if num_perm < 1 or shingle_words < 1:
            raise LmforgeError(f"MinHasher needs num_perm >= 1 and shingle_words >= 1 (got {num_perm} and {shingle_words})")
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        self.seed = seed
        rng = np.random.default_rng([seed, 0x6D696E68])
        self.a = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        self.b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)
        base = int(rng.integers(1 << 40, 1 << 62)) | 1  # odd, so it has an inverse modulo 2**64
        self.word_base = _U64(int(rng.integers(1 << 40, 1 << 62)) | 1)
        self.powers = _powers(base, self.PIECE_BYTES)
        self.inverse_powers = _powers(pow(base, -1, 1 << 64), self.PIECE_BYTES)
        self.empty = np.full(num_perm, EMPTY_VALUE, np.uint32)

    def __call__(self, text: str) -> np.ndarray:
        """The (num_perm,) uint32 signature of the text."""
        data = _separate(text if text.isascii() else text.casefold(), _WORD_TABLE, _WORD_CHAR)
        words, _ = self._word_hashes(data)
        if words.size == 0:
            return self.empty.copy()
        shingles = self._shingle_hashes(words)
        signature = self.empty.copy()
        for start in range(0, shingles.size, self.SHINGLE_BLOCK):
            block = shingles[start:start + self.SHINGLE_BLOCK, None] * self.a  # (block, num_perm), wrapping mod 2**32
            block += self.b
            np.minimum(signature, block.min(axis=0), out=signature)
        return signature

    def batch(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32: the signature of each text, equal to calling the hasher on each text but
        several times faster on short texts, because each numpy step runs once over the whole batch."""
        data, offsets = _separate_batch(texts, _WORD_TABLE, _WORD_CHAR)  # no word spans two texts
        words, word_starts = self._word_hashes(data)
        first_word = np.searchsorted(word_starts, offsets)  # (texts + 1,): text i's words are first_word[i:i+2]
        shingles, counts = self._batch_shingle_hashes(words, first_word)
        signatures = np.full((self.num_perm, len(texts)), EMPTY_VALUE, np.uint32)  # texts without shingles keep this
        texts_with = np.flatnonzero(counts)
        segment_ends = np.cumsum(counts[texts_with])
        segment_starts = segment_ends - counts[texts_with]
        buffer = np.empty((self.num_perm, min(self.SHINGLE_BLOCK, shingles.size)), np.uint32)  # reused: no page faults
        for start in range(0, shingles.size, self.SHINGLE_BLOCK):
            stop = min(start + self.SHINGLE_BLOCK, shingles.size)
            block = np.multiply(self.a[:, None], shingles[None, start:stop], out=buffer[:, :stop - start])  # mod 2**32
            block += self.b[:, None]
            # the texts whose shingles overlap this block; the first and last may go on in the next block
            first, last = np.searchsorted(segment_ends, start, "right"), np.searchsorted(segment_starts, stop)
            bounds = np.maximum(segment_starts[first:last], start) - start
            columns = texts_with[first:last]
            signatures[:, columns] = np.minimum(signatures[:, columns], np.minimum.reduceat(block, bounds, axis=1))
        return np.ascontiguousarray(signatures.T)

    def _word_hashes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(words,) uint64: one hash per run of non-space bytes, and (words,) int64: the byte offset of each."""
        hashes, starts = [], []
        start = 0
        while start < len(data):
            end = len(data) if len(data) - start <= self.PIECE_BYTES else data.rfind(b" ", start, start + self.PIECE_BYTES) + 1
            if end <= start:  # one word longer than a piece: it is hashed as several words
                end = start + self.PIECE_BYTES
            piece_hashes, piece_starts = self._piece_word_hashes(np.frombuffer(data, np.uint8, end - start, start))
            hashes.append(piece_hashes)
            starts.append(piece_starts + start)
            start = end
        if len(hashes) == 1:
            return hashes[0], starts[0]
        return (np.concatenate(hashes), np.concatenate(starts)) if hashes else (np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def _piece_word_hashes(self, piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        is_word = np.zeros(piece.size + 2, bool)
        np.not_equal(piece, 32, out=is_word[1:-1])
        # the edges alternate: a word starts, the word ends
        starts, ends = np.flatnonzero(is_word[1:] != is_word[:-1]).reshape(-1, 2).T
        prefix = np.zeros(piece.size + 1, np.uint64)
        np.cumsum(piece * self.powers[:piece.size], out=prefix[1:])
        # sum of byte * base**(position - start): the same for a word wherever it stands
        return _mix64((prefix[ends] - prefix[starts]) * self.inverse_powers[starts]), starts

    def _shingle_hashes(self, words: np.ndarray) -> np.ndarray:
        """(shingles,) uint32: a polynomial in the words' hashes over each window of shingle_words words."""
        width = min(self.shingle_words, words.size)
        count = words.size - width + 1
        combined = words[:count].copy()
        for offset in range(1, width):
            combined *= self.word_base
            combined += words[offset:offset + count]
        return (combined >> _U64(32)).astype(np.uint32)

    def _batch_shingle_hashes(self, words: np.ndarray, first_word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_shingle_hashes` of each text's words (text i's are words[first_word[i]:first_word[i+1]]), concatenated,
        and the (texts,) int64 count of each text's shingles."""
        width = self.shingle_words
        counts = np.diff(first_word)
        short = np.flatnonzero((counts > 0) & (counts < width))  # one shingle of all their words
        padded = np.concatenate([words, np.zeros(width - 1, np.uint64)])
        combined = words.copy()  # combined[i]: the polynomial of words i .. i + offset
        short_hashes = np.zeros(short.size, np.uint64)
        for offset in range(1, width):
            done = counts[short] == offset
            short_hashes[done] = combined[first_word[short[done]]]
            combined *= self.word_base
            combined += padded[offset:offset + words.size]
        shingle_counts = np.where(counts >= width, counts - width + 1, np.minimum(counts, 1))
        shingle_starts = np.cumsum(shingle_counts) - shingle_counts
        # shingle j of text i starts at word first_word[i] + j
        index = np.arange(shingle_counts.sum()) + np.repeat(first_word[:-1] - shingle_starts, shingle_counts)
        shingles = combined[index]
        shingles[shingle_starts[short]] = short_hashes
        return (shingles >> _U64(32)).astype(np.uint32), shingle_counts


def cluster_near_duplicates(signatures: np.ndarray, bands: int, rows: int, threshold: float,
                            progress: bool = False) -> np.ndarray:
    """For (N, bands*rows) uint32 signatures (a memmap is fine), the (N,) int64 array `keeper`: keeper[i] is the
    smallest index of i's duplicate cluster, so keeper[i] == i for the documents to keep.

    Documents sharing a whole band are candidates; a candidate pair is a duplicate when at least `threshold` of
    its signature positions agree; duplicates are merged transitively. Within a band's bucket each member is
    compared with the bucket's smallest index first; members that fail seed further rounds (compared with the
    rest of the bucket), so the work stays near linear in the bucket size. All-0xFFFFFFFF (empty) signatures
    are never linked.
    """
    from tqdm import tqdm

    if not (isinstance(signatures, np.ndarray) and signatures.ndim == 2 and signatures.dtype == np.uint32):
        raise LmforgeError(f"signatures must be a 2-D uint32 array, got {getattr(signatures, 'shape', None)} "
                           f"{getattr(signatures, 'dtype', type(signatures).__name__)}")
    if bands < 1 or rows < 1 or signatures.shape[1] != bands * rows:
        raise LmforgeError(f"signatures have {signatures.shape[1]} values but bands x rows is {bands} x {rows}")
    if not 0 < threshold <= 1:
        raise LmforgeError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    count = signatures.shape[0]
    min_equal = math.ceil(threshold * signatures.shape[1] - 1e-9)
    parent = np.arange(count, dtype=np.int64)  # union-find forest, kept flat: parent[i] is i's root, its smallest index
    empty = _empty_rows(signatures)
    for band in tqdm(range(bands), desc="near-duplicate bands", unit="band", disable=not progress):
        keys = _band_keys(signatures, band * rows, rows)
        order = np.argsort(keys, kind="stable")  # ties stay in index order: each bucket starts at its smallest index
        order = order[~empty[order]]
        sorted_keys = keys[order]
        del keys
        same_as_next = sorted_keys[1:] == sorted_keys[:-1]
        in_bucket = np.zeros(order.size, bool)
        in_bucket[1:] |= same_as_next
        in_bucket[:-1] |= same_as_next
        members, bucket_keys = order[in_bucket], sorted_keys[in_bucket]
        if not members.size:
            continue
        bucket_ids = np.cumsum(np.concatenate(([False], bucket_keys[1:] != bucket_keys[:-1])))
        _link_buckets(signatures, members, bucket_ids, parent, min_equal)
    return parent


def _empty_rows(signatures: np.ndarray) -> np.ndarray:
    empty = np.asarray(signatures[:, 0]) == EMPTY_VALUE
    maybe = np.flatnonzero(empty)
    if maybe.size:
        empty[maybe] = (np.asarray(signatures[maybe]) == EMPTY_VALUE).all(axis=1)
    return empty


def _band_keys(signatures: np.ndarray, first: int, rows: int) -> np.ndarray:
    """(N,) uint64 hash of each row's values in columns first..first+rows-1."""
    band = np.asarray(signatures[:, first:first + rows])  # one pass over a memmap, (N, rows) uint32
    keys = np.zeros(band.shape[0], np.uint64)
    for column in range(rows):
        keys ^= band[:, column]
        keys = _mix64(keys)
    return keys


def _link_buckets(signatures: np.ndarray, members: np.ndarray, bucket_ids: np.ndarray, parent: np.ndarray,
                  min_equal: int) -> None:
    """Confirm and merge duplicates among each bucket's members (sorted by bucket, then index).

    Each round takes, in every bucket, the smallest member not yet matched (the pivot) and compares it with every
    member that has not been a pivot. Round one's pivot is the bucket's smallest index; a later pivot (a member
    that matched no earlier pivot) is compared with the members matched before too, so chains A~B~C are linked.
    """
    matched = np.zeros(members.size, bool)
    was_pivot = np.zeros(members.size, bool)
    for _ in range(MAX_PIVOT_ROUNDS):
        if not members.size:
            return
        position = np.arange(members.size)
        unmatched = position[~matched]
        first = np.concatenate(([True], bucket_ids[unmatched][1:] != bucket_ids[unmatched][:-1]))
        pivots = unmatched[first]  # one per bucket (every bucket here has an unmatched member)
        pivot_position = pivots[bucket_ids]
        others = position[~was_pivot & (pivot_position != position)]
        left, right = members[pivot_position[others]], members[others]
        duplicate = parent[left] == parent[right]  # already in one cluster: nothing to compare
        todo = np.flatnonzero(~duplicate)
        duplicate[todo] = _similar(signatures, left[todo], right[todo], min_equal)
        _union(parent, left[duplicate], right[duplicate])
        matched[others[duplicate]] = True
        matched[pivots] = was_pivot[pivots] = True
        # Keep the buckets that still have an unmatched member, numbered 0, 1, ... again.
        alive = np.zeros(pivots.size, bool)
        alive[bucket_ids[~matched]] = True
        keep = alive[bucket_ids]
        members, bucket_ids, matched, was_pivot = members[keep], bucket_ids[keep], matched[keep], was_pivot[keep]
        bucket_ids = np.cumsum(np.concatenate(([False], bucket_ids[1:] != bucket_ids[:-1]))) if members.size else bucket_ids


def _similar(signatures: np.ndarray, left: np.ndarray, right: np.ndarray, min_equal: int, chunk: int = 1 << 14) -> np.ndarray:
    """(pairs,) bool: whether each pair's signatures agree in at least min_equal positions."""
    result = np.empty(left.size, bool)
    for start in range(0, left.size, chunk):
        a, b = left[start:start + chunk], right[start:start + chunk]
        result[start:start + chunk] = (np.asarray(signatures[a]) == np.asarray(signatures[b])).sum(axis=1) >= min_equal
    return result


def _union(parent: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Merge the clusters of each pair, every root being its cluster's smallest index; leaves parent flat."""
    while left.size:
        left_root, right_root = parent[left], parent[right]
        apart = left_root != right_root
        if not apart.any():
            return
        left, right, left_root, right_root = left[apart], right[apart], left_root[apart], right_root[apart]
        # Hook the larger root under the smaller: parent[i] <= i always holds, so no cycle can form.
        np.minimum.at(parent, np.maximum(left_root, right_root), np.minimum(left_root, right_root))
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent[:] = grandparent


def cluster_report(keeper: np.ndarray, ids: Sequence[str] | Callable[[int], str], examples: int = 10) -> dict:
    """Duplicate clusters in numbers: how many (with more than one member), documents removed, a histogram of cluster
    sizes, and the largest clusters with their keeper's id and up to five member ids."""
    id_of = ids if callable(ids) else ids.__getitem__
    keeper = np.asarray(keeper)
    sizes = np.bincount(keeper, minlength=keeper.size)
    clustered = np.flatnonzero(sizes > 1)
    histogram_sizes, histogram_counts = np.unique(sizes[clustered], return_counts=True)
    largest = clustered[np.lexsort((clustered, -sizes[clustered]))[:examples]]
    return {
        "clusters": int(clustered.size),
        "documents_removed": int(np.count_nonzero(keeper != np.arange(keeper.size))),
        "size_histogram": {int(size): int(n) for size, n in zip(histogram_sizes, histogram_counts)},
        "largest": [{"keeper": id_of(int(root)), "size": int(sizes[root]),
                     "members": [id_of(int(i)) for i in np.flatnonzero(keeper == root)[:5]]} for root in largest],
    }
