"""Encode a data folder's splits into flat token files that pretraining reads with ``np.memmap``.

A tokens folder holds ``train.bin`` and ``val.bin`` (raw arrays of token ids, no header), ``meta.json``
and, last, ``manifest.json``. Each document is laid out as ``[bos] + ids + [eos]`` and the documents are
concatenated, so any window of the file is a valid training sequence and EOS marks where documents end.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge import artifacts
from lmforge.errors import LmforgeError
from lmforge.tokenizer.bpe import Tokenizer

SPLITS = ("train", "val")
META_FILE = "meta.json"
# Big enough to keep every core busy inside one encode_batch call, small enough to stream.
DOCUMENTS_PER_BATCH = 1000
# The tokens stage has no recipe section; this is the config its manifest fingerprints.
TOKENS_CONFIG: dict = {}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id (uint16 halves the files of small vocabularies)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _documents_as_tokens(batch_ids: list[list[int]], bos_id: int, eos_id: int, dtype: np.dtype) -> np.ndarray:
    """One flat array of ``[bos] + ids + [eos]`` for each document of a batch."""
    total = sum(len(ids) for ids in batch_ids) + 2 * len(batch_ids)
    laid_out = itertools.chain.from_iterable(([bos_id], ids, [eos_id]) for ids in batch_ids)
    return np.fromiter(itertools.chain.from_iterable(laid_out), dtype=dtype, count=total)


def _encode_split(
    tokenizer: Tokenizer, data_dir: Path, split: str, path: Path, dtype: np.dtype, progress: bool, expected_documents: int | None
) -> dict:
    """Append a split's documents to ``path`` batch by batch; returns its counts."""
    from lmforge.data.stage import iter_documents

    counts = {"tokens": 0, "documents": 0, "bytes": 0, "characters": 0}
    texts = (document["text"] for document in iter_documents(data_dir, split))
    with open(path, "wb") as handle, tqdm(
        desc=f"encoding {split}", unit="doc", total=expected_documents, disable=not progress
    ) as bar:
        for batch in _batches(texts, DOCUMENTS_PER_BATCH):
            tokens = _documents_as_tokens(tokenizer.encode_batch(batch), tokenizer.bos_id, tokenizer.eos_id, dtype)
            tokens.tofile(handle)
            counts["tokens"] += len(tokens)
            counts["documents"] += len(batch)
            # Bytes, not characters, are what bits-per-byte divides by.
            counts["bytes"] += sum(len(text.encode("utf-8")) for text in batch)
            counts["characters"] += sum(len(text) for text in batch)
            bar.update(len(batch))
    if counts["tokens"] == 0:
        raise LmforgeError(f"the {split} split of {data_dir} has no documents; every split needs at least one")
    return counts


def encode_corpus(data_dir: Path, tokenizer_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Encode the train and val splits of ``data_dir`` with the tokenizer in ``tokenizer_dir``.

    Writes ``<split>.bin``, ``meta.json`` and the manifest (last) to a fresh ``out_dir``; returns the manifest.
    """
    data_manifest = artifacts.read_manifest(data_dir, "data")
    tokenizer_manifest = artifacts.read_manifest(tokenizer_dir, "tokenizer")
    tokenizer = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = artifacts.fresh_folder(out_dir)

    started = time.perf_counter()
    splits = {}
    for split in SPLITS:
        # Only for the progress bar's total; the data stage records it, but we do not rely on it.
        expected_documents = data_manifest["stats"].get(f"{split}_documents")
        splits[split] = _encode_split(tokenizer, data_dir, split, out_dir / f"{split}.bin", dtype, progress, expected_documents)
    seconds = time.perf_counter() - started

    meta = {
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "layout": "documents concatenated, each as [bos_id] + tokens + [eos_id]",
        "splits": splits,
    }
    artifacts.atomic_write_json(out_dir / META_FILE, meta)
    total_tokens = sum(counts["tokens"] for counts in splits.values())
    stats = {
        **{f"{split}_tokens": counts["tokens"] for split, counts in splits.items()},
        **{f"{split}_documents": counts["documents"] for split, counts in splits.items()},
        "train_bytes_per_token": round(splits["train"]["bytes"] / splits["train"]["tokens"], 4),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total_tokens / seconds) if seconds > 0 else None,
    }
    inputs = {"data": data_manifest["fingerprint"], "tokenizer": tokenizer_manifest["fingerprint"]}
    return artifacts.write_manifest(out_dir, "tokens", TOKENS_CONFIG, inputs=inputs, stats=stats)


def read_token_meta(tokens_dir: Path) -> dict:
    """``meta.json`` of a completed tokens folder: dtype, vocab_size, special ids and per-split counts."""
    tokens_dir = Path(tokens_dir)
    artifacts.read_manifest(tokens_dir, "tokens")
    meta = artifacts.read_json(tokens_dir / META_FILE, what="token meta")
    missing = [key for key in ("dtype", "vocab_size", "bos_id", "eos_id", "splits") if key not in meta]
    if missing:
        raise LmforgeError(f"token meta {tokens_dir / META_FILE} lacks {', '.join(missing)}; run `lmforge tokens` again")
    return meta


def load_tokens(tokens_dir: Path, split: str) -> np.memmap:
    """A read-only memory map of one split's token ids."""
    tokens_dir = Path(tokens_dir)
    meta = read_token_meta(tokens_dir)
    if split not in meta["splits"]:
        raise LmforgeError(f"no {split!r} split in {tokens_dir} (has: {', '.join(meta['splits'])})")
    expected_tokens = meta["splits"][split]["tokens"]
    if expected_tokens == 0:
        raise LmforgeError(f"the {split} split in {tokens_dir} has no tokens")
    path = tokens_dir / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    if not path.exists():
        raise LmforgeError(f"token file not found: {path}; run `lmforge tokens` again")
    size = path.stat().st_size
    if size != expected_tokens * dtype.itemsize:
        raise LmforgeError(
            f"token file {path} is {size} bytes, expected {expected_tokens * dtype.itemsize} "
            f"({expected_tokens} {dtype.name} tokens); run `lmforge tokens` again"
        )
    return np.memmap(path, dtype=dtype, mode="r")
