"""Reading documents out of files: plain text, Markdown, JSON lines and HTML, optionally gzip or zstd compressed.

A file is read as a whole or not at all. Anything that makes it unusable (a binary file, bytes that are
not UTF-8, a corrupt archive, a permission error, a FIFO) raises ``SkippedFile`` with a short reason,
which the stage records in its report; nothing here crashes the build.

Invalid UTF-8 policy: a file that is not valid UTF-8 is skipped whole (reason ``invalid_utf8``) rather
than decoded with replacement characters, so no silently mangled text reaches the tokenizer. A leading
UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import zstandard

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".html": "html", ".htm": "html"}
COMPRESSIONS = (".gz", ".zst")
CHUNK_BYTES = 1 << 20
BINARY_PROBE_BYTES = 8192


@dataclass(frozen=True)
class RawDocument:
    """One document as read, before cleaning: a text or HTML file, a JSONL record, a stdlib module.

    ``rejected_because`` is set for JSONL lines that hold no usable document (bad JSON, no text
    field); their ``text`` is the line itself and ``detail`` says what is wrong.
    """

    id: str
    text: str
    source: str
    rejected_because: str | None = None
    detail: str | None = None


class SkippedFile(Exception):
    """A file that cannot be read; ``reason`` is a short category for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def file_format(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file name: ``dump.jsonl.zst`` -> ("jsonl", ".zst"); format None if unsupported."""
    name = path.name.lower()
    compression = next((suffix for suffix in COMPRESSIONS if name.endswith(suffix)), None)
    if compression:
        name = name[: -len(compression)]
    return FORMATS.get(os.path.splitext(name)[1]), compression


def list_files(folder: Path) -> list[Path]:
    """Every non-folder entry under ``folder``, recursively, in name order; symlinked folders are followed
    once; a folder that cannot be listed is returned as an entry itself."""
    found: list[Path] = []
    visited: set[Path] = set()

    def walk(directory: Path) -> None:
        real = directory.resolve()
        if real in visited:  # a symlink loop, or a folder reached twice
            return
        visited.add(real)
        try:
            entries = sorted(directory.iterdir(), key=lambda entry: entry.name)
        except OSError:  # read_file reports it as unreadable
            found.append(directory)
            return
        for entry in entries:
            if entry.is_dir():
                walk(entry)
            else:
                found.append(entry)

    walk(folder)
    return found


def read_file(path: Path, doc_id: str, text_field: str) -> list[RawDocument]:
    """The documents in one file: one for text and HTML files, one per non-blank line for JSONL.

    ``doc_id`` names the file in document ids (JSONL records get ``<doc_id>:<line number>``).
    Raises SkippedFile when the file cannot be used.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SkippedFile("unreadable", exc.strerror or str(exc)) from None
    if stat.S_ISDIR(mode):  # list_files hands over a folder it could not list
        raise SkippedFile("unreadable", "a folder that cannot be listed")
    if not stat.S_ISREG(mode):  # opening a FIFO or a device would block or never end
        raise SkippedFile("not_a_regular_file", "not a regular file")
    kind, compression = file_format(path)
    if kind is None:
        supported = f"{', '.join(FORMATS)}, optionally {' or '.join(COMPRESSIONS)}"
        raise SkippedFile("unsupported_extension", f"not one of {supported}")
    chunks = iter_text_chunks(path, compression)
    try:
        if kind == "jsonl":
            return list(read_jsonl(iter_lines(chunks), doc_id, str(path), text_field))
        text = "".join(chunks)
    except UnicodeDecodeError as exc:
        raise SkippedFile("invalid_utf8", f"not valid UTF-8 ({exc.reason})") from None
    if kind == "html":
        text = html_to_text(text)
    return [RawDocument(doc_id, text, str(path))]


def iter_text_chunks(path: Path, compression: str | None) -> Iterator[str]:
    """Decoded text of a file, decompressed and checked chunk by chunk; raises SkippedFile or UnicodeDecodeError."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    probed = 0
    try:
        for chunk in iter_decompressed_chunks(path, compression):
            if probed < BINARY_PROBE_BYTES:
                if b"\0" in chunk[: BINARY_PROBE_BYTES - probed]:
                    raise SkippedFile("binary", f"NUL bytes in the first {BINARY_PROBE_BYTES} bytes (binary, or UTF-16)")
                probed += len(chunk)
            yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    except (EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise SkippedFile("corrupt_compressed", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        # gzip reports a damaged archive as an OSError (BadGzipFile); anything else is the file system.
        reason = "corrupt_compressed" if isinstance(exc, gzip.BadGzipFile) else "unreadable"
        raise SkippedFile(reason, exc.strerror or str(exc)) from None


def iter_decompressed_chunks(path: Path, compression: str | None) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        if compression == ".gz":
            with gzip.GzipFile(fileobj=handle) as unpacked:
                while chunk := unpacked.read(CHUNK_BYTES):
                    yield chunk
        elif compression == ".zst":
            yield from iter_zstd_chunks(handle)
        else:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk


def iter_zstd_chunks(handle) -> Iterator[bytes]:
    """Decompress every frame of a zstd file; unlike zstandard's stream reader, notice a truncated one."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    inside_frame = False
    while compressed := handle.read(CHUNK_BYTES):
        while compressed:
            inside_frame = True
            yield frame.decompress(compressed)
            if not frame.eof:
                break
            compressed, frame, inside_frame = frame.unused_data, decompressor.decompressobj(), False
    if inside_frame:
        raise zstandard.ZstdError("truncated: the last frame never ends")


def iter_lines(chunks: Iterator[str]) -> Iterator[str]:
    pending = ""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split("\n")
        yield from lines
    if pending:
        yield pending


def read_jsonl(lines: Iterator[str], doc_id: str, source: str, text_field: str) -> Iterator[RawDocument]:
    """One RawDocument per non-blank line; lines without a usable text are returned as rejected records."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record_id = f"{doc_id}:{line_number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            yield RawDocument(record_id, line, source, "invalid_json", str(exc)[:200])
            continue
        if not isinstance(record, dict):
            yield RawDocument(record_id, line, source, "not_an_object", f"a JSON {type(record).__name__}, not an object")
        elif text_field not in record:
            yield RawDocument(record_id, line, source, "missing_text_field", f"no field `{text_field}`")
        elif not isinstance(record[text_field], str):
            type_name = type(record[text_field]).__name__
            yield RawDocument(record_id, line, source, "text_not_a_string", f"`{text_field}` is a {type_name}")
        else:
            yield RawDocument(record_id, record[text_field], source)


WHITESPACE_RUN = re.compile(r"\s+")


class HtmlTextExtractor(HTMLParser):
    """Collects the visible text of an HTML page.

    Tags disappear; the content of script, style, template and head (title included) is dropped;
    block elements become line breaks or blank lines; whitespace collapses as a browser would,
    except inside <pre>.
    """

    HIDDEN = frozenset({"script", "style", "template", "head"})
    PARAGRAPH_BREAK = frozenset(
        {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre", "section", "article"}
        | {"header", "footer", "nav", "aside", "main", "figure", "form", "hr", "address", "details", "fieldset"}
    )
    LINE_BREAK = frozenset({"br", "li", "tr", "div", "dt", "dd", "figcaption", "summary", "caption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden: list[str] = []
        self.pre_depth = 0
        self.trailing_newlines = 2  # the start of the page counts as a paragraph boundary

    def text(self) -> str:
        return "".join(self.parts)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "body" and "head" in self.hidden:  # a <head> never closed ends where <body> starts
            self.hidden.clear()
        if tag in self.HIDDEN:
            self.hidden.append(tag)
        elif tag == "pre":
            self.pre_depth += 1
        self.break_for(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.hidden:
            del self.hidden[self.hidden.index(tag) :]
        elif tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in ("td", "th"):
            self.append("\t")
        elif tag != "br":
            self.break_for(tag)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if not self.pre_depth:
            data = WHITESPACE_RUN.sub(" ", data)
            if not self.parts or self.parts[-1][-1] in " \t\n":
                data = data.lstrip(" ")
        self.append(data)

    def break_for(self, tag: str) -> None:
        wanted = 2 if tag in self.PARAGRAPH_BREAK else 1 if tag in self.LINE_BREAK else 0
        if wanted > self.trailing_newlines and not self.hidden:
            self.append("\n" * (wanted - self.trailing_newlines))

    def append(self, text: str) -> None:
        if not text:
            return
        self.parts.append(text)
        stripped = text.rstrip("\n")
        if stripped:
            self.trailing_newlines = len(text) - len(stripped)
        else:
            self.trailing_newlines += len(text)


def html_to_text(html: str) -> str:
    """The visible text of an HTML document (see HtmlTextExtractor)."""
    extractor = HtmlTextExtractor()
    try:
        extractor.feed(html)
        extractor.close()
    except Exception as exc:  # html.parser gives up on a few malformed constructs with an assertion
        raise SkippedFile("unparsable_html", f"{type(exc).__name__}: {exc}") from None
    return extractor.text()
