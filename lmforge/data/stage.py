"""The data stage: read the sources, clean, cut, deduplicate and split documents, and write the data folder.

The folder it writes::

    train-00000.jsonl.gz ...     kept documents, {"id", "text", "source", "chars"} per line
    val-00000.jsonl.gz ...       the held-out split, same records
    rejected/rejected-00000.jsonl.gz ...   every dropped document, with "reason" (and "duplicate_of")
    report.json                  counts for every step (also the manifest's stats)
    manifest.json                written last: the folder is complete only once it exists

Every shard's bytes depend only on the recipe and the inputs, so two builds of the same data are
byte-identical. Shards are read back with ``iter_documents``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from lmforge.artifacts import atomic_write_json, fingerprint, fresh_folder, read_manifest, write_manifest
from lmforge.config import DataConfig
from lmforge.data.clean import clean_text, cut_into_pieces, rejection_reason
from lmforge.data.readers import RawDocument, SkippedFile, list_files, read_file
from lmforge.data.stdlib_docs import module_documents, topic_documents
from lmforge.errors import LmforgeError

STAGE = "data"
SPLITS = ("train", "val")
# `stdlib` is the whole standard-library corpus; the variants pick one half of it.
STDLIB_SOURCES = {"stdlib": ("topics", "modules"), "stdlib:topics": ("topics",), "stdlib:modules": ("modules",)}
# Part of the stdlib inputs' fingerprint: bump it when the extracted text changes, so old folders rebuild.
STDLIB_CORPUS_VERSION = 1
GZIP_LEVEL = 6


@dataclass(frozen=True)
class FileSource:
    """A file or folder named in the recipe, with the files found in it and the id prefix of each."""

    spec: str
    files: list[tuple[Path, str]]


@dataclass(frozen=True)
class StdlibSource:
    """`stdlib` or one of its variants; ``parts`` is a subset of ("topics", "modules")."""

    spec: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class KeptDocument:
    """A piece that passed every filter; ``digest`` (sha256 of the text) decides its split."""

    id: str
    text: str
    source: str
    digest: bytes

    def record(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "chars": len(self.text)}


@dataclass
class Tally:
    """Counts gathered while reading and filtering, for the report."""

    files_read: int = 0
    skipped_files: list[dict] = field(default_factory=list)
    documents_read: int = 0
    documents_after_cutting: int = 0
    rejected: Counter = field(default_factory=Counter)
    stdlib_modules_failed: list[dict] = field(default_factory=list)

    def skip(self, path: Path, reason: str, detail: str) -> None:
        self.skipped_files.append({"path": str(path), "reason": reason, "detail": detail})

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(item["reason"] for item in self.skipped_files).items()))


def build_corpus(config: DataConfig, out_dir: Path, progress: bool = True) -> dict:
    """Read config.sources, clean, dedup, split; write shards + report.json + rejected/ + manifest.json (last).

    Returns the stats dict (the same as report.json). Raises LmforgeError when a source does not
    exist or no document survives filtering (the folder is then left without a manifest).
    """
    started = time.perf_counter()
    sources = resolve_sources(config.sources)
    inputs = inputs_fingerprints(sources)  # taken before reading, so a file edited meanwhile triggers a rebuild
    out_dir = fresh_folder(out_dir)
    tally = Tally()
    with ShardWriter(out_dir / "rejected", "rejected", config.shard_docs) as rejected:
        kept = select_documents(iter_raw_documents(sources, tally, config.text_field, progress), config, tally, rejected)
    report = {"sources": list(config.sources), **tally_report(tally)}
    if not kept:
        atomic_write_json(out_dir / "report.json", report)
        details = out_dir / "report.json"
        raise LmforgeError(f"no documents left after filtering: {what_happened(tally)}; details in {details}")
    train, val = split_documents(kept, config.val_fraction)
    for split, documents in (("train", train), ("val", val)):
        with ShardWriter(out_dir, split, config.shard_docs) as writer:
            for document in documents:
                writer.write(document.record())
        report[f"{split}_documents"] = len(documents)
        report[f"{split}_chars"] = sum(len(document.text) for document in documents)
        report[f"{split}_shards"] = writer.shard_names
    report["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_json(out_dir / "report.json", report)
    write_manifest(out_dir, STAGE, config.model_dump(mode="json"), inputs, report)
    return report


def data_inputs(config: DataConfig) -> dict[str, str]:
    """Fingerprints of the inputs, one per source, for the manifest and the up-to-date check.

    A file or folder is fingerprinted by (resolved path, size, mtime_ns) of every file found in it;
    a stdlib source by the Python version. Raises LmforgeError for a source that does not exist.
    """
    return inputs_fingerprints(resolve_sources(config.sources))


def iter_documents(data_dir: Path, split: str) -> Iterator[dict]:
    """Yield the {"id", "text", "source", "chars"} records of one split ("train" or "val") of a finished data folder.

    Raises LmforgeError (at the call, not at the first record) if the folder has no manifest.json
    or the split is unknown, and while iterating if a shard is corrupt.
    """
    if split not in SPLITS:
        raise LmforgeError(f"unknown data split `{split}`; expected one of {', '.join(SPLITS)}")
    read_manifest(data_dir, STAGE)
    return iter_shard_records(sorted(Path(data_dir).glob(f"{split}-*.jsonl.gz")))


def iter_shard_records(shards: list[Path]) -> Iterator[dict]:
    for shard in shards:
        try:
            with gzip.open(shard, "rt", encoding="utf-8") as lines:
                for line in lines:
                    yield json.loads(line)
        except (OSError, EOFError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise LmforgeError(f"corrupt data shard {shard}: {problem}; run `lmforge data` again") from None


def resolve_sources(specs: list[str]) -> list[FileSource | StdlibSource]:
    """Check every source exists and list its files; ids are paths relative to the sources' common parent folder."""
    resolved: list[StdlibSource | Path] = []
    for spec in specs:
        if spec in STDLIB_SOURCES:
            resolved.append(StdlibSource(spec, STDLIB_SOURCES[spec]))
        elif spec.startswith("stdlib:"):
            raise LmforgeError(f"unknown data source `{spec}`; the stdlib sources are {', '.join(STDLIB_SOURCES)}")
        elif not Path(spec).exists():
            raise LmforgeError(f"data source not found: {spec}")
        else:
            resolved.append(Path(spec))
    paths = [Path(os.path.abspath(item)) for item in resolved if isinstance(item, Path)]
    common_parent = Path(os.path.commonpath([path.parent for path in paths])) if paths else None
    sources = []
    for spec, item in zip(specs, resolved):
        if isinstance(item, StdlibSource):
            sources.append(item)
            continue
        label = Path(os.path.abspath(item)).relative_to(common_parent).as_posix()
        if item.is_dir():
            files = [(path, f"{label}/{path.relative_to(item).as_posix()}") for path in list_files(item)]
        else:
            files = [(item, label)]
        sources.append(FileSource(spec, files))
    return sources


def inputs_fingerprints(sources: list[FileSource | StdlibSource]) -> dict[str, str]:
    inputs = {}
    for source in sources:
        if isinstance(source, StdlibSource):
            inputs[source.spec] = fingerprint("stdlib", source.parts, sys.version, STDLIB_CORPUS_VERSION)
        else:
            inputs[source.spec] = fingerprint([file_identity(path) for path, _ in source.files])
    return inputs


def file_identity(path: Path) -> tuple[str, int, int]:
    try:
        status = path.stat()
    except OSError:  # a broken symlink still counts as a file found
        status = path.lstat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns


def iter_raw_documents(
    sources: list[FileSource | StdlibSource], tally: Tally, text_field: str, progress: bool
) -> Iterator[RawDocument]:
    """Every document of every source in recipe order; unusable files are recorded in the tally, not raised."""
    files_done: set[Path] = set()
    for source in sources:
        if isinstance(source, FileSource):
            yield from iter_file_documents(source, files_done, tally, text_field, progress)
            continue
        if "topics" in source.parts:
            yield from topic_documents()
        if "modules" in source.parts:
            documents, failed = module_documents(progress)
            tally.stdlib_modules_failed.extend(failed)
            yield from documents


def iter_file_documents(
    source: FileSource, files_done: set[Path], tally: Tally, text_field: str, progress: bool
) -> Iterator[RawDocument]:
    """The documents of a file source's files, skipping files already read through an earlier source."""
    bar = tqdm(source.files, desc=f"reading {source.spec}", unit="file", disable=not progress, file=sys.stderr, leave=False)
    for path, doc_id in bar:
        real_path = path.resolve()
        if real_path in files_done:
            tally.skip(path, "already_read", "named by an earlier source")
            continue
        files_done.add(real_path)
        try:
            documents = read_file(path, doc_id, text_field)
        except SkippedFile as skipped:
            tally.skip(path, skipped.reason, skipped.detail)
            continue
        tally.files_read += 1
        yield from documents


def select_documents(
    raw_documents: Iterable[RawDocument], config: DataConfig, tally: Tally, rejected: ShardWriter
) -> list[KeptDocument]:
    """Clean and cut each document; keep the pieces that are long enough and not seen before, reject the rest.

    Each piece's id is ``<document id>#<piece index>``. Rejected pieces are written to ``rejected``
    with their reason; a duplicate also names the id of the piece it repeats.
    """
    first_id_by_digest: dict[bytes, str] = {}
    kept: list[KeptDocument] = []

    def reject(record: dict, reason: str, **details: str) -> None:
        tally.rejected[reason] += 1
        rejected.write({**record, "reason": reason, **details})

    for raw in raw_documents:
        tally.documents_read += 1
        if raw.rejected_because:
            tally.documents_after_cutting += 1
            record = {"id": raw.id, "text": raw.text, "source": raw.source, "chars": len(raw.text)}
            reject(record, raw.rejected_because, detail=raw.detail or "")
            continue
        for index, piece in enumerate(cut_into_pieces(clean_text(raw.text), config.max_doc_chars)):
            tally.documents_after_cutting += 1
            record = {"id": f"{raw.id}#{index}", "text": piece, "source": raw.source, "chars": len(piece)}
            reason = rejection_reason(piece, config.min_chars)
            if reason:
                reject(record, reason)
                continue
            digest = hashlib.sha256(piece.encode("utf-8")).digest()
            if digest in first_id_by_digest:
                reject(record, "duplicate", duplicate_of=first_id_by_digest[digest])
                continue
            first_id_by_digest[digest] = record["id"]
            kept.append(KeptDocument(record["id"], piece, raw.source, digest))
    return kept


def split_position(digest: bytes) -> float:
    """Where a document falls in [0, 1): those below val_fraction go to validation."""
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(kept: list[KeptDocument], val_fraction: float) -> tuple[list[KeptDocument], list[KeptDocument]]:
    """(train, val) by content hash, in reading order. With val_fraction > 0 and two or more documents
    neither split is empty: the document nearest the boundary changes side if needed. A single
    document always goes to train."""
    positions = [split_position(document.digest) for document in kept]
    in_val = [position < val_fraction for position in positions]
    if len(kept) == 1:
        in_val = [False]
    elif val_fraction > 0 and not any(in_val):
        in_val[positions.index(min(positions))] = True
    elif val_fraction > 0 and all(in_val):
        in_val[positions.index(max(positions))] = False
    train = [document for document, is_val in zip(kept, in_val) if not is_val]
    val = [document for document, is_val in zip(kept, in_val) if is_val]
    return train, val


def tally_report(tally: Tally) -> dict:
    kept = tally.documents_after_cutting - sum(tally.rejected.values())
    return {
        "files_read": tally.files_read,
        "files_skipped": len(tally.skipped_files),
        "files_skipped_by_reason": tally.skipped_by_reason(),
        "skipped_files": tally.skipped_files,
        "documents_read": tally.documents_read,
        "documents_after_cutting": tally.documents_after_cutting,
        "rejected": dict(sorted(tally.rejected.items())),
        "rejected_total": sum(tally.rejected.values()),
        "kept": kept,
        "stdlib_modules_failed": tally.stdlib_modules_failed,
    }


def what_happened(tally: Tally) -> str:
    """A one-line account of where the documents went, for the empty-corpus error."""

    def listing(counts: dict[str, int]) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))

    parts = [f"{tally.documents_read} documents read ({tally.documents_after_cutting} after cutting)"]
    if tally.rejected:
        parts.append(f"rejected: {listing(tally.rejected)}")
    if tally.skipped_files:
        parts.append(f"{tally.files_read} files read, skipped: {listing(tally.skipped_by_reason())}")
    return "; ".join(parts)


class ShardWriter:
    """Writes records as gzip-compressed JSON lines to ``<folder>/<prefix>-00000.jsonl.gz``, ... with at
    most ``docs_per_shard`` records each. A shard gets its final name only once complete, and its bytes
    depend only on its records (no timestamp or file name in the gzip header). Use it as a context
    manager; on an error the unfinished shard is removed."""

    def __init__(self, folder: Path, prefix: str, docs_per_shard: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.docs_per_shard = docs_per_shard
        self.shard_names: list[str] = []
        self.records_in_shard = 0
        self.temp_path: Path | None = None
        self.raw = None
        self.compressed = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finish_shard()
        elif self.temp_path is not None:
            self.compressed.close()
            self.raw.close()
            self.temp_path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if self.compressed is None:
            self.start_shard()
        self.compressed.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.records_in_shard += 1
        if self.records_in_shard == self.docs_per_shard:
            self.finish_shard()

    def start_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shard_names):05d}.jsonl.gz"
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        self.temp_path = Path(temp)
        self.raw = os.fdopen(fd, "wb")
        self.compressed = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, compresslevel=GZIP_LEVEL, mtime=0)
        self.shard_names.append(name)

    def finish_shard(self) -> None:
        if self.compressed is None:
            return
        self.compressed.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.temp_path, self.folder / self.shard_names[-1])
        self.compressed = self.raw = self.temp_path = None
        self.records_in_shard = 0
