"""Reading documents out of source files, streaming, with provenance.

Formats: plain text, Markdown and reStructuredText (cut into blocks), HTML (main text extracted), JSON lines,
JSON, CSV/TSV and Parquet (one document per record), and folders written by `datasets`' ``save_to_disk``;
every line or text format may also be gzip or zstd compressed.

A file that cannot be used at all (missing, a FIFO, binary, empty, a corrupt archive header, ...) raises
``SkippedFile`` before any document comes out. After that, nothing is raised: a bad record (invalid JSON,
invalid UTF-8, a line over ``max_line_bytes``, a missing field) comes out as a RawDocument with
``rejected_because`` set, and a file that breaks off (a truncated archive, a read error) ends with one such
record, so the documents before it stay valid and one bad line never costs the rest of its file.

Invalid UTF-8 in text, Markdown, RST and HTML is decoded as U+FFFD and counted in ``replaced_bytes``, unless
more than 1% of the first 64 KiB is invalid: then the file is most likely in another encoding and is skipped.
"""

from __future__ import annotations

import csv
import errno
import gzip
import itertools
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Iterator

import zstandard

from lmforge.data.extract import extract_html

EXTENSIONS = {
    ".txt": "text", ".md": "markdown", ".rst": "rst", ".html": "html", ".htm": "html",
    ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
}
COMPRESSIONS = (".gz", ".zst")
TEXT_KINDS = ("text", "markdown", "rst")
CHUNK_BYTES = 1 << 20
BINARY_PROBE_BYTES = 8192
UTF8_PROBE_BYTES = 64 << 10
MAX_INVALID_UTF8_FRACTION = 0.01
REJECTED_TEXT_BYTES = 1024  # what a rejected record keeps of a line too long to hold
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ReadOptions:
    """How to read source files; the stage fills it from the recipe (`data` and the source's own settings)."""

    text_field: str = "text"          # JSON field / CSV-TSV column / Parquet or Arrow column with the text
    html_method: str = "selectolax"
    max_line_bytes: int = 16 << 20    # a JSONL/CSV line longer than this is rejected ("line_too_long") without buffering it
    max_file_bytes: int = 64 << 20    # html/json files are read whole; bigger ones: SkippedFile("file_too_large")
    block_chars: int = 1 << 20        # text-like files are streamed as blocks of at most this many characters


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One document as read, before cleaning, and where it came from.

    ``id`` is stable across runs: ``<doc_id>`` for a text file of one block or an HTML page,
    ``<doc_id>@<byte offset>`` for each block of a longer text file, ``<doc_id>:<line>`` (1-based) for
    JSONL, ``<doc_id>:<row>`` (0-based) for CSV/TSV, JSON arrays, Parquet and `datasets` rows.
    A record with ``rejected_because`` set holds no usable document; ``text`` is what was read of it.
    """

    id: str
    text: str
    source: str
    kind: str = "text"
    offset: int | None = None
    row: int | None = None
    rejected_because: str | None = None
    detail: str | None = None
    replaced_bytes: int = 0


class SkippedFile(Exception):
    """A file that cannot be read; ``reason`` is a short category for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # args that rebuild it, so it pickles across worker processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def file_format(path: Path) -> tuple[str | None, str | None]:
    """(kind, compression) from the file name: ``dump.jsonl.zst`` -> ("jsonl", ".zst"); kind None if unsupported."""
    extension, compression = split_extension(path)
    kind = EXTENSIONS.get(extension)
    if kind == "parquet" and compression:  # Parquet compresses inside; an outer layer would force reading it whole
        return None, compression
    return kind, compression


def split_extension(path: Path) -> tuple[str, str | None]:
    """(extension, compression): ``dump.TSV.gz`` -> (".tsv", ".gz")."""
    name = path.name.lower()
    compression = next((suffix for suffix in COMPRESSIONS if name.endswith(suffix)), None)
    if compression:
        name = name[: -len(compression)]
    return os.path.splitext(name)[1], compression


def is_dataset_folder(path: Path) -> bool:
    """True for a folder written by `datasets`' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    # os.path.isfile says False where Path.is_file raises: inside a folder that cannot be read
    is_file = [os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "dataset_info.json", "state.json")]
    return is_file[0] or (is_file[1] and is_file[2])


def list_source_files(folder: Path, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[Path]:
    """The files under ``folder`` to read, recursively, in name order.

    A `datasets` folder is one entry; a folder that cannot be listed is an entry too (read_documents
    reports it). Symlinked folders are followed once, so loops end, and each real file is listed once.
    ``include``/``exclude`` are globs matched against the path relative to ``folder`` or the bare name, so
    ``*.md`` matches at any depth; an excluded folder is not entered.
    """
    include, exclude = list(include), list(exclude)
    found: list[Path] = []
    seen_files: set[str] = set()
    seen_folders: set[str] = set()

    def matches(relative: str, patterns: list[str]) -> bool:
        name = relative.rpartition("/")[2]
        return any(fnmatchcase(relative, pattern) or fnmatchcase(name, pattern) for pattern in patterns)

    def add(path: Path, relative: str) -> None:
        real = os.path.realpath(path)
        if real not in seen_files and (not include or matches(relative, include)):
            seen_files.add(real)
            found.append(path)

    def walk(directory: Path, prefix: str) -> None:
        real = os.path.realpath(directory)
        if real in seen_folders:  # a symlink loop, or a folder reached twice
            return
        seen_folders.add(real)
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:  # reported as unreadable when read; its files may well match
            found.append(directory)
            return
        for entry in entries:
            relative = prefix + entry.name
            if exclude and matches(relative, exclude):
                continue
            path = directory / entry.name
            if not is_folder(entry):  # a broken or looping link is listed as a file, and reported when read
                add(path, relative)
            elif is_dataset_folder(path):
                add(path, relative)
            else:
                walk(path, relative + "/")

    folder = Path(folder)
    if is_dataset_folder(folder):
        return [folder]
    walk(folder, "")
    return found


def is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:  # a symlink loop
        return False


def read_documents(path: Path, doc_id: str, options: ReadOptions = ReadOptions()) -> Iterator[RawDocument]:
    """The documents in one file or `datasets` folder, streamed; ``doc_id`` names the file in document ids.

    Raises SkippedFile before the first document when the file cannot be used; a failure after that is
    yielded as a last record with ``rejected_because`` set.
    """
    path = Path(path)
    mode = file_mode(path)
    if stat.S_ISDIR(mode):
        if is_dataset_folder(path):
            yield from rejecting_failures(read_dataset(path, doc_id, options), doc_id, str(path), "arrow")
            return
        try:
            os.scandir(path).close()
        except OSError as exc:
            raise SkippedFile("unreadable", f"a folder that cannot be listed ({exc.strerror})") from None
        raise SkippedFile("not_a_regular_file", "a folder, not a file")
    if not stat.S_ISREG(mode):  # opening a FIFO or a device would block or never end
        raise SkippedFile("not_a_regular_file", "not a regular file")
    kind, compression = file_format(path)
    if kind is None:
        supported = f"{', '.join(EXTENSIONS)}, optionally {' or '.join(COMPRESSIONS)} (not Parquet)"
        raise SkippedFile("unsupported_extension", f"not one of {supported}")
    if kind == "parquet":
        yield from rejecting_failures(read_parquet(path, doc_id, options), doc_id, str(path), kind)
        return
    source = ByteSource(path, compression)
    if kind in TEXT_KINDS:
        documents = read_text(source, doc_id, kind, options)
    elif kind == "jsonl":
        documents = read_jsonl(source, doc_id, options)
    elif kind == "csv":
        documents = read_csv(source, doc_id, options, delimiter="\t" if split_extension(path)[0] == ".tsv" else ",")
    elif kind == "json":
        documents = read_json(source, doc_id, options)
    else:
        documents = read_html(source, doc_id, options)
    yield from rejecting_failures(documents, doc_id, str(path), kind, source)


def file_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SkippedFile("symlink_loop", "a symbolic link that leads back to itself") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise SkippedFile("broken_symlink", f"a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise SkippedFile("unreadable", exc.strerror or str(exc)) from None


def rejecting_failures(
    documents: Iterator[RawDocument], doc_id: str, source_path: str, kind: str, source: ByteSource | None = None
) -> Iterator[RawDocument]:
    """Pass documents on; a SkippedFile after the first one becomes a last rejected record instead."""
    last = None
    try:
        for document in documents:
            last = document
            yield document
    except SkippedFile as failure:
        if last is None:
            raise
        if source is not None:
            record_id, offset, row = f"{doc_id}@{source.bytes_read}", source.bytes_read, None
        else:  # a row format: the failure takes the next row's place
            offset, row = None, last.row + 1
            record_id = f"{last.id.rpartition(':')[0]}:{row}"
        yield RawDocument(record_id, "", source_path, kind, offset, row, failure.reason, failure.detail)


class ByteSource:
    """The decompressed bytes of a file in chunks, counting how many came out; failures raise SkippedFile."""

    def __init__(self, path: Path, compression: str | None):
        self.path = path
        self.compression = compression
        self.bytes_read = 0
        self.start = 0  # where the text starts: 3 after a UTF-8 byte-order mark

    def chunks(self) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as handle:
                for chunk in decompressed_chunks(handle, self.compression):
                    self.bytes_read += len(chunk)
                    yield chunk
        except (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as exc:
            raise SkippedFile("corrupt_compressed", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise SkippedFile("unreadable", exc.strerror or str(exc)) from None

    def checked_chunks(self) -> Iterator[bytes]:
        """The chunks, after checking that the file is neither empty nor binary; a leading BOM is dropped."""
        chunks = self.chunks()
        head, at_end = read_head(chunks, BINARY_PROBE_BYTES)
        if not head.strip() and at_end:
            raise SkippedFile("empty_file", "no bytes" if not head else "only whitespace")
        if b"\0" in head[:BINARY_PROBE_BYTES]:
            raise SkippedFile("binary", f"NUL bytes in the first {BINARY_PROBE_BYTES} bytes (binary, or UTF-16)")
        if head.startswith(UTF8_BOM):
            head, self.start = head[len(UTF8_BOM) :], len(UTF8_BOM)
        return itertools.chain([head], chunks)

    def read_whole(self, max_bytes: int) -> bytes:
        """All of the file, or SkippedFile("file_too_large") once it passes ``max_bytes``."""
        if not self.compression and os.path.getsize(self.path) > max_bytes:
            raise SkippedFile("file_too_large", f"{os.path.getsize(self.path)} bytes, more than max_file_bytes {max_bytes}")
        parts, size = [], 0
        for chunk in self.checked_chunks():
            size += len(chunk)
            if size > max_bytes:
                raise SkippedFile("file_too_large", f"more than max_file_bytes {max_bytes} once decompressed")
            parts.append(chunk)
        return b"".join(parts)


def decompressed_chunks(handle, compression: str | None) -> Iterator[bytes]:
    """Chunks of at most CHUNK_BYTES, so a highly compressed file never unpacks into memory at once."""
    if compression == ".gz":
        yield from gzip_chunks(handle)
    elif compression == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True, closefd=False)
        while chunk := reader.read(CHUNK_BYTES):
            yield chunk
        # zstandard's reader ends quietly on a truncated frame, so check that every frame ends where it says.
        problem = zstd_frames_problem(handle)
        if problem:
            raise zstandard.ZstdError(problem)
    else:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def gzip_chunks(handle) -> Iterator[bytes]:
    """Decompress every member of a gzip file. Unlike GzipFile.read, which drops the part of a chunk it had
    unpacked when the file breaks off, a truncated file yields everything before the break, then EOFError."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending, inside_member = b"", False
    while True:
        if not pending:
            pending = handle.read(CHUNK_BYTES)
            if not pending:
                break
        if not inside_member and not pending.strip(b"\0"):  # zero padding after the last member, as gzip allows
            pending = b""
            continue
        inside_member = True
        chunk = decompressor.decompress(pending, CHUNK_BYTES)
        if chunk:
            yield chunk
        if decompressor.eof:  # a member ended; another may follow
            pending, inside_member = decompressor.unused_data, False
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        else:
            pending = decompressor.unconsumed_tail
    if inside_member:
        raise EOFError("the compressed file ends before its end-of-stream marker (truncated)")


def zstd_frames_problem(handle) -> str | None:
    """Why the zstd frames in ``handle`` do not tile the file exactly (a truncated last frame), or None.

    Walks frame and block headers only (RFC 8878), seeking over the compressed data.
    """
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    truncated = "truncated: the last frame never ends"
    while handle.tell() < size:
        header = handle.read(5)
        if len(header) < 5:
            return truncated
        magic, descriptor = int.from_bytes(header[:4], "little"), header[4]
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame: its length follows
            handle.seek(int.from_bytes(header[4:] + handle.read(3), "little"), os.SEEK_CUR)
            continue
        if magic != 0xFD2FB528:
            return "data after the last frame is not a zstd frame"
        single_segment = descriptor >> 5 & 1
        content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
        dictionary_id_bytes = (0, 1, 2, 4)[descriptor & 3]
        handle.seek((1 - single_segment) + dictionary_id_bytes + content_size_bytes, os.SEEK_CUR)
        last_block = False
        while not last_block:
            header = handle.read(3)
            if len(header) < 3:
                return truncated
            value = int.from_bytes(header, "little")
            last_block, block_type = bool(value & 1), value >> 1 & 3
            handle.seek(1 if block_type == 1 else value >> 3, os.SEEK_CUR)  # an RLE block stores one byte
        if descriptor >> 2 & 1:  # a content checksum closes the frame
            handle.seek(4, os.SEEK_CUR)
    return truncated if handle.tell() > size else None


def read_head(chunks: Iterator[bytes], size: int) -> tuple[bytes, bool]:
    """At least ``size`` bytes from the start of ``chunks`` (fewer at its end), and whether the end was reached."""
    parts, length = [], 0
    for chunk in chunks:
        parts.append(chunk)
        length += len(chunk)
        if length >= size:
            return b"".join(parts), False
    return b"".join(parts), True


def decode_replacing(data: bytes | bytearray) -> tuple[str, int]:
    """UTF-8 text with each invalid byte as U+FFFD, and how many bytes were replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        # surrogateescape maps each invalid byte to one lone surrogate, which makes them easy to count
        return INVALID_BYTE.subn("\ufffd", data.decode("utf-8", "surrogateescape"))


INVALID_BYTE = re.compile("[\udc80-\udcff]")


def check_mostly_utf8(head: bytes) -> None:
    """SkippedFile("invalid_utf8") when more than 1% of the first 64 KiB are not UTF-8 (another encoding)."""
    probe = head[: char_boundary(head, UTF8_PROBE_BYTES)]  # not counting a character cut in half
    _, invalid = decode_replacing(probe)
    if invalid > MAX_INVALID_UTF8_FRACTION * len(probe):
        raise SkippedFile("invalid_utf8", f"{invalid} of the first {len(probe)} bytes are not valid UTF-8 (another encoding?)")


def char_boundary(data: bytes | bytearray, position: int) -> int:
    """``position`` moved back past UTF-8 continuation bytes, so a cut there does not split a character."""
    start = position
    while position > max(0, start - 3) and position < len(data) and data[position] & 0xC0 == 0x80:
        position -= 1
    return position


def read_text(source: ByteSource, doc_id: str, kind: str, options: ReadOptions) -> Iterator[RawDocument]:
    """Text, Markdown or RST in blocks of at most ``block_chars``; one block keeps the bare ``doc_id``."""
    chunks = source.checked_chunks()
    head, _ = read_head(chunks, UTF8_PROBE_BYTES)
    check_mostly_utf8(head)
    blocks = cut_blocks(itertools.chain([head], chunks), options.block_chars, source.start)
    del head  # the generator lives as long as the file is read

    def document(block: tuple[int, str, int], single: bool) -> RawDocument:
        offset, text, replaced = block
        block_id = doc_id if single else f"{doc_id}@{offset}"
        return RawDocument(block_id, text, str(source.path), kind, offset, replaced_bytes=replaced)

    held, single = None, True  # one block is held back to learn whether the file has more than one
    try:
        for block in blocks:
            if held:
                single = False
                yield document(held, single)
            held = block
    except SkippedFile:
        if held:  # more bytes followed it, so it was not the only block
            yield document(held, single=False)
        raise
    if held:
        yield document(held, single)


def cut_blocks(chunks: Iterator[bytes], block_bytes: int, offset: int) -> Iterator[tuple[int, str, int]]:
    """(byte offset, text, replaced bytes) of blocks of at most ``block_bytes`` bytes, so at most as many
    characters; cut after the last blank line, else the last newline, else the last space, else anywhere
    between two characters. Blocks of only whitespace are dropped."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > block_bytes:
            cut = block_end(buffer, block_bytes)
            block = buffer[:cut]
            del buffer[:cut]
            if not block.isspace():
                yield offset, *decode_replacing(block)
            offset += cut
    if buffer and not buffer.isspace():
        yield offset, *decode_replacing(buffer)


def block_end(buffer: bytearray, limit: int) -> int:
    for separator in (b"\n\n", b"\n", b" "):
        found = buffer.rfind(separator, 0, limit)
        if found >= 0:
            return found + len(separator)
    return char_boundary(buffer, limit) or limit


def split_lines(chunks: Iterator[bytes], max_line_bytes: int, offset: int = 0) -> Iterator[tuple[int, int, bytes, int]]:
    """(line number from 1, byte offset, line without its newline, its length in bytes) for every line.

    A line longer than ``max_line_bytes`` comes back as its first REJECTED_TEXT_BYTES bytes with its full
    length; the rest of it is dropped as it streams past, never held.
    """
    number = 0
    pending: list[bytes] = []  # the start of a line that continues in the next chunk
    pending_bytes = 0
    too_long_start = None  # the start of an over-long line whose remaining bytes are being dropped
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        unfinished = pieces.pop()
        for piece in pieces:
            number += 1
            length = pending_bytes + len(piece)
            if too_long_start is not None:
                yield number, offset, too_long_start, length
                too_long_start = None
            else:
                line = b"".join(pending) + piece if pending else piece
                yield number, offset, line[:REJECTED_TEXT_BYTES] if length > max_line_bytes else line, length
            offset += length + 1
            pending, pending_bytes = [], 0
        pending_bytes += len(unfinished)
        if too_long_start is None:
            pending.append(unfinished)
            if pending_bytes > max_line_bytes:
                too_long_start = b"".join(pending)[:REJECTED_TEXT_BYTES]
                pending = []
    if pending_bytes:
        line = too_long_start if too_long_start is not None else b"".join(pending)
        yield number + 1, offset, line, pending_bytes


def read_jsonl(source: ByteSource, doc_id: str, options: ReadOptions) -> Iterator[RawDocument]:
    """One RawDocument per non-blank line; a line without a usable text is a rejected record, and reading goes on."""
    path = str(source.path)
    chunks = source.checked_chunks()
    for number, offset, line, length in split_lines(chunks, options.max_line_bytes, source.start):
        if not line or line.isspace():
            continue
        text, reason, detail, replaced = parse_jsonl_line(line, length, options)
        if reason:
            detail = f"{path}:{number}: {detail}"
        yield RawDocument(f"{doc_id}:{number}", text, path, "jsonl", offset, number, reason, detail, replaced)


def parse_jsonl_line(line: bytes, length: int, options: ReadOptions) -> tuple[str, str | None, str | None, int]:
    """(text, None, None, 0) for a usable line; else (what was read, reason, detail, bytes replaced)."""
    if length > options.max_line_bytes:
        text, replaced = decode_replacing(line)
        return text, "line_too_long", f"{length} bytes, more than max_line_bytes {options.max_line_bytes}", replaced
    try:
        line_text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        text, replaced = decode_replacing(line)
        return text, "invalid_utf8", f"invalid UTF-8 at byte {exc.start} of the line", replaced
    try:
        record = json.loads(line_text)
    except (ValueError, RecursionError) as exc:
        return line_text, "invalid_json", str(exc)[:200], 0
    text, reason, detail = text_of_record(record, options.text_field)
    return (line_text, reason, detail, 0) if reason else (text, None, None, 0)


MISSING = object()
JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def text_of_record(record, field: str) -> tuple[str, str | None, str]:
    """(text, None, "") for a record with a string at ``field`` (``a.b`` reaches into nested objects), else
    ("", reason, detail)."""
    if not isinstance(record, dict):
        return "", "not_an_object", f"a JSON {JSON_TYPE_NAMES.get(type(record), type(record).__name__)}, not an object"
    value = record.get(field, MISSING)
    if value is MISSING and "." in field:
        value = record
        for key in field.split("."):
            value = value.get(key, MISSING) if isinstance(value, dict) else MISSING
    if value is MISSING:
        return "", "missing_text_field", f"no field `{field}`"
    if not isinstance(value, str):
        return "", "text_not_a_string", f"`{field}` is a {JSON_TYPE_NAMES.get(type(value), type(value).__name__)}"
    return value, None, ""


def read_json(source: ByteSource, doc_id: str, options: ReadOptions) -> Iterator[RawDocument]:
    """A JSON array of objects (one document per element) or a single object (one document, row 0)."""
    path = str(source.path)
    data = source.read_whole(options.max_file_bytes)
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SkippedFile("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        hint = " (JSON lines? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise SkippedFile("invalid_json", f"{path}:{exc.lineno}: {exc.msg}{hint}") from None
    except RecursionError:
        raise SkippedFile("invalid_json", f"{path}: nested too deeply") from None
    if isinstance(records, dict):
        records = [records]
    elif not isinstance(records, list):
        found = JSON_TYPE_NAMES.get(type(records), type(records).__name__)
        raise SkippedFile("not_an_object", f"a JSON {found}; expected an array of objects or one object")
    for row, record in enumerate(records):
        text, reason, detail = text_of_record(record, options.text_field)
        if reason:
            text, detail = json.dumps(record, ensure_ascii=False)[:REJECTED_TEXT_BYTES], f"{path}: row {row}: {detail}"
        yield RawDocument(f"{doc_id}:{row}", text, path, "json", row=row, rejected_because=reason, detail=detail or None)


class CsvLines:
    """Decoded lines for csv.reader, remembering what was wrong with the lines of the row being read."""

    def __init__(self, lines: Iterator[tuple[int, int, bytes, int]], path: str, max_line_bytes: int):
        self.lines = lines
        self.path = path
        self.max_line_bytes = max_line_bytes
        self.problem: tuple[str, str] | None = None  # (reason, detail) of the first bad line of the current row
        self.next_number, self.next_offset = 1, None

    def __iter__(self) -> CsvLines:
        return self

    def __next__(self) -> str:
        number, offset, line, length = next(self.lines)
        self.next_number, self.next_offset = number + 1, offset + length + 1
        if length > self.max_line_bytes:
            self.note("line_too_long", f"{self.path}:{number}: {length} bytes, more than max_line_bytes {self.max_line_bytes}")
            return "\n"
        text, replaced = decode_replacing(line)
        if replaced:
            self.note("invalid_utf8", f"{self.path}:{number}: {replaced} bytes of invalid UTF-8")
        return text + "\n"  # csv needs the newline to keep line breaks inside quoted fields

    def note(self, reason: str, detail: str) -> None:
        if self.problem is None:
            self.problem = reason, detail


def read_csv(source: ByteSource, doc_id: str, options: ReadOptions, delimiter: str) -> Iterator[RawDocument]:
    """One document per row below the header; the text is the column named ``text_field``."""
    path = str(source.path)
    csv.field_size_limit(options.max_line_bytes)  # the stdlib default (128 KiB) is smaller than a long document
    chunks = source.checked_chunks()
    lines = CsvLines(split_lines(chunks, options.max_line_bytes, source.start), path, options.max_line_bytes)
    rows = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(rows)
    except csv.Error as exc:
        raise SkippedFile("invalid_csv", f"{path}:1: {exc}") from None
    except StopIteration:
        raise SkippedFile("empty_file", "no header row") from None
    if options.text_field not in header:
        raise SkippedFile("missing_text_field", f"no column `{options.text_field}` in the header ({', '.join(header)[:200]})")
    column = header.index(options.text_field)
    row_index = 0
    while True:
        lines.problem = None
        number, offset = lines.next_number, lines.next_offset
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            row, lines.problem = None, ("invalid_csv", f"{path}:{number}: {exc}")
        if row == [] and lines.problem is None:  # a blank line
            continue
        record_id = f"{doc_id}:{row_index}"
        text = row[column] if row and column < len(row) else ""
        problem = lines.problem
        if problem is None and (row is None or column >= len(row)):
            problem = "missing_text_field", f"{path}:{number}: the row has {len(row)} fields, no `{options.text_field}`"
        if problem:
            text = text or delimiter.join(row or [])
            yield RawDocument(record_id, text, path, "csv", offset, row_index, *problem)
        else:
            yield RawDocument(record_id, text, path, "csv", offset, row_index)
        row_index += 1


def read_html(source: ByteSource, doc_id: str, options: ReadOptions) -> Iterator[RawDocument]:
    """One document: the page's main text, by ``options.html_method``."""
    data = source.read_whole(options.max_file_bytes)
    check_mostly_utf8(data)
    html, replaced = decode_replacing(data)
    text = extract_html(html, options.html_method)
    yield RawDocument(doc_id, text, str(source.path), "html", 0, replaced_bytes=replaced)


def text_column(schema, field: str, path: Path) -> int:
    """The index of the string column ``field`` in an Arrow schema, or SkippedFile."""
    import pyarrow as pa

    if field not in schema.names:
        raise SkippedFile("missing_text_field", f"no column `{field}` ({', '.join(schema.names)[:200]})")
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise SkippedFile("text_not_a_string", f"column `{field}` holds {column_type}, not strings")
    return schema.get_field_index(field)


def column_documents(
    batches: Iterator, column: int, id_prefix: str, path: str, kind: str, field: str, first_row: int = 0
) -> Iterator[RawDocument]:
    """One document per row of the record batches; a null is a rejected record."""
    row = first_row
    for batch in batches:
        for text in batch.column(column).to_pylist():
            if text is None:
                detail = f"{path}: row {row}: `{field}` is null"
                yield RawDocument(f"{id_prefix}:{row}", "", path, kind, row=row, rejected_because="text_not_a_string", detail=detail)
            else:
                yield RawDocument(f"{id_prefix}:{row}", text, path, kind, row=row)
            row += 1


ARROW_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)  # pyarrow's errors derive from these


def read_parquet(path: Path, doc_id: str, options: ReadOptions) -> Iterator[RawDocument]:
    """One document per row of the text column, a row group's batches at a time (never the whole file)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except ARROW_ERRORS as exc:
        raise SkippedFile("corrupt_file", f"not a readable Parquet file: {exc}") from None
    text_column(parquet.schema_arrow, options.text_field, path)
    batches = parquet.iter_batches(batch_size=1024, columns=[options.text_field])
    try:
        yield from column_documents(batches, 0, doc_id, str(path), "parquet", options.text_field)
    except ARROW_ERRORS as exc:
        raise SkippedFile("corrupt_file", f"Parquet data cannot be read: {exc}") from None


def dataset_parts(folder: Path, doc_id: str) -> list[tuple[str, list[Path]]]:
    """(id prefix, Arrow files) for a Dataset folder, or for each split of a DatasetDict folder in its order."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            return [(f"{doc_id}/{split}", dataset_parts(folder / split, doc_id)[0][1]) for split in splits]
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [(doc_id, [folder / entry["filename"] for entry in state["_data_files"]])]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SkippedFile("corrupt_dataset", f"cannot read the `datasets` folder description: {type(exc).__name__}: {exc}") from None


def read_dataset(folder: Path, doc_id: str, options: ReadOptions) -> Iterator[RawDocument]:
    """Rows of a `datasets` save_to_disk folder; its .arrow files are Arrow IPC streams."""
    import pyarrow as pa

    parts = dataset_parts(folder, doc_id)
    try:
        for _, files in parts:  # check every file's column before the first document
            for file in files:
                with pa.OSFile(str(file)) as handle:
                    text_column(pa.ipc.open_stream(handle).schema, options.text_field, file)
        for id_prefix, files in parts:
            row = 0
            for file in files:
                with pa.OSFile(str(file)) as handle:
                    reader = pa.ipc.open_stream(handle)
                    column = reader.schema.get_field_index(options.text_field)
                    for document in column_documents(reader, column, id_prefix, str(folder), "arrow", options.text_field, row):
                        row += 1
                        yield document
    except ARROW_ERRORS as exc:
        raise SkippedFile("corrupt_dataset", f"{type(exc).__name__}: {exc}") from None

