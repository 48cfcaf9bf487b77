"""Reading the user's evaluation files: every problem is one line naming the file (and line), never a traceback."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from lmforge.errors import LmforgeError


def read_text_file(path: Path, what: str = "text") -> str:
    """The text of a UTF-8 file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read().decode("utf-8")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise LmforgeError(f"{path} is a folder; expected a {what} file") from None
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not valid UTF-8 text (byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # gzip reports a corrupt or truncated file as OSError/EOFError
        raise LmforgeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def read_jsonl_objects(path: Path, what: str, allow_empty: bool = False) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; an empty file is an error unless allowed."""
    records = []
    for number, line in enumerate(read_text_file(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise LmforgeError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records and not allow_empty:
        raise LmforgeError(f"{path} holds no {what} records")
    return records


def string_field(record: dict, key: str, where: str) -> str:
    """``record[key]``, which must be a non-empty string; ``where`` is ``file:line``."""
    if key not in record:
        raise LmforgeError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise LmforgeError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LmforgeError(f"{where}: field {key!r} is empty")
    return value
