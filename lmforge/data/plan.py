"""Planning a data build: the recipe's sources resolved to files, grouped into work shards.

A work shard is a list of input units (a file, a `datasets` folder or a part of the stdlib corpus) of
about ``data.shard_mb`` megabytes. Shards are the unit of parallelism and of resumption: each is
processed alone (by a worker process, or as task i of N on a cluster) into its own folder, and the
plan depends only on the recipe and the inputs, so every task of a cluster job computes the same one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.artifacts import fingerprint
from lmforge.config import DataConfig, SourceConfig
from lmforge.data.readers import is_dataset_folder, list_source_files
from lmforge.errors import LmforgeError

# `stdlib` is the whole standard-library corpus; the variants pick one half of it.
STDLIB_SOURCES = {"stdlib": ("topics", "modules"), "stdlib:topics": ("topics",), "stdlib:modules": ("modules",)}
# Part of the stdlib inputs' fingerprint: bump it when the extracted text changes, so old folders rebuild.
STDLIB_CORPUS_VERSION = 1
# What a stdlib part weighs when shards are packed (the modules' docs are about 1.5 MB, the topics about 1 MB).
STDLIB_PART_BYTES = {"topics": 1 << 20, "modules": 3 << 19}


@dataclass(frozen=True)
class Source:
    """One entry of `data.sources`, resolved: its files (or stdlib parts), mixing weight and field."""

    index: int
    spec: str
    weight: float
    text_field: str
    files: tuple[tuple[str, str, int], ...] = ()  # (path, document id prefix, bytes)
    stdlib_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unit:
    """One input of a work shard: ``kind`` is "file" (a file or a `datasets` folder) or "stdlib"."""

    source: int
    kind: str
    path: str  # the file, or the stdlib part's name
    doc_id: str
    size: int


def resolve_sources(config: DataConfig) -> list[Source]:
    """Check every source exists and list its files; ids are paths relative to the file sources' common parent folder.

    Raises LmforgeError for a source that does not exist or an unknown stdlib variant.
    """
    entries = [entry if isinstance(entry, SourceConfig) else SourceConfig(path=entry) for entry in config.sources]
    for entry in entries:
        if entry.path in STDLIB_SOURCES:
            continue
        if entry.path.startswith("stdlib:"):
            raise LmforgeError(f"unknown data source `{entry.path}`; the stdlib sources are {', '.join(STDLIB_SOURCES)}")
        if not os.path.lexists(entry.path):
            raise LmforgeError(f"data source not found: {entry.path}")
    file_paths = [Path(os.path.abspath(entry.path)) for entry in entries if entry.path not in STDLIB_SOURCES]
    common_parent = Path(os.path.commonpath([path.parent for path in file_paths])) if file_paths else None
    sources = []
    for index, entry in enumerate(entries):
        field = entry.text_field or config.text_field
        if entry.path in STDLIB_SOURCES:
            sources.append(Source(index, entry.path, entry.weight, field, stdlib_parts=STDLIB_SOURCES[entry.path]))
            continue
        path = Path(entry.path)
        label = Path(os.path.abspath(path)).relative_to(common_parent).as_posix()
        if path.is_dir() and not is_dataset_folder(path):
            found = list_source_files(path, entry.include, entry.exclude)
            files = [(str(item), f"{label}/{item.relative_to(path).as_posix()}", _size(item)) for item in found]
        else:
            files = [(str(path), label, _size(path))]
        sources.append(Source(index, entry.path, entry.weight, field, files=tuple(files)))
    return sources


def _size(path: Path) -> int:
    try:
        if path.is_dir():  # a `datasets` folder: its Arrow files
            return sum(item.stat().st_size for item in path.rglob("*.arrow"))
        return path.stat().st_size
    except OSError:
        return 0


def plan_shards(sources: list[Source], shard_bytes: int) -> tuple[list[list[Unit]], list[dict]]:
    """Units in recipe order, packed greedily into shards of at most ``shard_bytes`` (a bigger unit is a shard alone),
    and the files skipped because an earlier source already names them (each file is read once)."""
    units: list[Unit] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for source in sources:
        for part in source.stdlib_parts:
            units.append(Unit(source.index, "stdlib", part, f"stdlib/{part}", STDLIB_PART_BYTES[part]))
        for path, doc_id, size in source.files:
            real = os.path.realpath(path)
            if real in seen:
                skipped.append({"path": path, "reason": "already_read", "detail": "named by an earlier source"})
                continue
            seen.add(real)
            units.append(Unit(source.index, "file", path, doc_id, size))
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    current_bytes = 0
    for unit in units:
        if current and current_bytes + unit.size > shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(unit)
        current_bytes += unit.size
    if current:
        shards.append(current)
    return shards, skipped


def inputs_fingerprints(sources: list[Source]) -> dict[str, str]:
    """One fingerprint per source: (resolved path, size, mtime) of each file; the Python version for stdlib parts."""
    inputs = {}
    for source in sources:
        key = source.spec if source.spec not in inputs else f"{source.spec}#{source.index}"
        if source.stdlib_parts:
            inputs[key] = fingerprint("stdlib", source.stdlib_parts, sys.version, STDLIB_CORPUS_VERSION)
        else:
            inputs[key] = fingerprint([identity for path, _, _ in source.files for identity in path_identities(Path(path))])
    return inputs


def path_identities(path: Path) -> list[tuple[str, int, int]]:
    """(real path, size, mtime_ns) of a file, or of every file in a folder (a `datasets` folder, an evaluation folder)."""
    if path.is_dir():
        return [file_identity(item) for item in sorted(path.rglob("*")) if not item.is_dir()]
    return [file_identity(path)]


def file_identity(path: Path) -> tuple[str, int, int]:
    try:
        status = path.stat()
    except OSError:  # a broken symlink or a symlink loop still counts as a file found
        status = path.lstat()
    return os.path.realpath(path), status.st_size, status.st_mtime_ns  # realpath: resolve() raises on a loop


def units_to_json(shards: list[list[Unit]]) -> list[list[dict]]:
    return [[asdict(unit) for unit in shard] for shard in shards]


def units_from_json(shards: list[list[dict]]) -> list[list[Unit]]:
    return [[Unit(**unit) for unit in shard] for shard in shards]
