"""Artifacts on disk: atomic writes, fingerprints and the manifest that completes every stage folder.

A stage folder is trusted only when its ``manifest.json`` exists; the manifest is written last, so a
folder without one is an interrupted stage. A stage whose manifest records the same fingerprint as the
one it would compute now is up to date and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

MANIFEST_NAME = "manifest.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates owner-only files; artifacts get the permissions any new file would.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line LmforgeError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{what} is corrupt (not valid JSON): {path}: {exc}") from None


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (config sections, upstream fingerprints)."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, stage: str, config: Any, inputs: dict[str, str], stats: dict[str, Any]) -> dict:
    """Complete a stage folder. ``inputs`` maps input names to their fingerprints."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "fingerprint": fingerprint(stage, config, inputs),
        "config": config,
        "inputs": inputs,
        "stats": stats,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(Path(folder) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(folder: Path, stage: str) -> dict:
    """The manifest of a completed stage folder, or a clear error naming what is missing."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists():
        if folder.exists():
            raise LmforgeError(f"the {stage} stage in {folder} is incomplete (no {MANIFEST_NAME}); run `lmforge {stage}` again")
        raise LmforgeError(f"no {stage} artifact at {folder}; run `lmforge {stage}` first")
    manifest = read_json(path, what=f"{stage} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(f"{path} has format version {manifest.get('format_version')}, this lmforge reads {FORMAT_VERSION}")
    return manifest


def is_up_to_date(folder: Path, stage: str, config: Any, inputs: dict[str, str]) -> bool:
    """True when the folder holds a completed stage built from the same config and inputs."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("fingerprint") == fingerprint(stage, config, inputs)


def fresh_folder(folder: Path) -> Path:
    """Empty a stage folder before rebuilding it, so no stale file survives next to new ones."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


class RunLayout:
    """Where each stage's artifact lives inside ``<workdir>/<name>/``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.recipe = self.root / "recipe.yaml"
        self.data = self.root / "data"
        self.tokenizer = self.root / "tokenizer"
        self.tokens = self.root / "tokens"
        self.checkpoints = self.root / "checkpoints"
        self.logs = self.root / "logs"
        self.eval = self.root / "eval"
        self.export = self.root / "export"
