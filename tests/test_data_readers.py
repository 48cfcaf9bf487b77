"""Source readers on real files: every format, provenance, streaming memory, and every way a file or a line
can be bad."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.readers import (
    RawDocument,
    ReadOptions,
    SkippedFile,
    file_format,
    is_dataset_folder,
    list_source_files,
    read_documents,
)

BUILTIN = ReadOptions(html_method="builtin")
PROSE = "A sentence of plain prose about reading files. "


def read(path: Path, options: ReadOptions = BUILTIN, doc_id: str | None = None) -> list[RawDocument]:
    return list(read_documents(path, doc_id or path.name, options))


def skip_reason(path: Path, options: ReadOptions = BUILTIN) -> str:
    with pytest.raises(SkippedFile) as skipped:
        read(path, options)
    return skipped.value.reason


def kept(documents: list[RawDocument]) -> list[str]:
    return [document.text for document in documents if not document.rejected_because]


def reasons(documents: list[RawDocument]) -> dict[str, str]:
    return {document.id: document.rejected_because for document in documents if document.rejected_because}


def test_file_format_from_the_name() -> None:
    assert file_format(Path("dump.JSONL.zst")) == ("jsonl", ".zst")
    assert file_format(Path("notes.rst.gz")) == ("rst", ".gz")
    assert file_format(Path("table.tsv")) == ("csv", None)
    assert file_format(Path("rows.parquet.gz")) == (None, ".gz")
    assert file_format(Path("image.png")) == (None, None)


def test_text_is_cut_into_blocks_at_blank_lines_then_newlines_then_spaces(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {n}. " + PROSE * (n % 4 + 1) for n in range(40)]
    content = "\n\n".join(paragraphs) + "\nlast line without a blank line before it\n"
    path = tmp_path / "notes.md"
    path.write_text(content, encoding="utf-8")
    raw = content.encode("utf-8")

    documents = read(path, ReadOptions(block_chars=300))

    assert "".join(document.text for document in documents) == content
    assert all(len(document.text) <= 300 for document in documents)
    for document in documents:
        assert document.id == f"notes.md@{document.offset}"
        assert raw[document.offset :].startswith(document.text.encode("utf-8"))
        assert document.kind == "markdown" and document.source == str(path)
    # every block but the last ends at a paragraph boundary, since each paragraph fits in a block
    assert all(document.text.endswith("\n\n") for document in documents[:-1])

    one_line = tmp_path / "line.txt"
    one_line.write_text("word " * 100, encoding="utf-8")
    blocks = read(one_line, ReadOptions(block_chars=64))
    assert [len(block.text) for block in blocks[:-1]] == [60] * (len(blocks) - 1)  # cut after the last space
    assert "".join(block.text for block in blocks) == "word " * 100


def test_a_short_text_file_is_one_document_with_the_bare_id(tmp_path: Path) -> None:
    path = tmp_path / "short.rst"
    path.write_bytes(b"\xef\xbb\xbfTitle\n=====\n\nBody text.\n")  # the byte-order mark is dropped
    [document] = read(path, doc_id="corpus/short.rst")
    assert document == RawDocument("corpus/short.rst", "Title\n=====\n\nBody text.\n", str(path), "rst", offset=3)


def test_a_long_single_line_streams_in_bounded_blocks_without_splitting_characters(tmp_path: Path) -> None:
    path = tmp_path / "one_line.txt"
    unit = "é漢" * 1000  # 2- and 3-byte characters, no spaces or newlines: every cut is a hard one
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(6400):  # 32 MB
            out.write(unit)
    block_chars = 1 << 18

    tracemalloc.start()
    count = replaced = 0
    total_chars = 0
    for document in read_documents(path, "one_line", ReadOptions(block_chars=block_chars)):
        count += 1
        total_chars += len(document.text)
        replaced += document.replaced_bytes
        assert document.text[0] in "é漢"  # no block starts inside a character
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert total_chars == len(unit) * 6400 and replaced == 0
    assert -(-path.stat().st_size // block_chars) <= count <= 1 + path.stat().st_size // block_chars
    assert peak < 6 << 20 < path.stat().st_size / 4  # bounded by the block and read sizes, not the file's


def test_invalid_utf8_in_text_is_replaced_and_counted_but_another_encoding_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "mostly_fine.txt"
    path.write_bytes(PROSE.encode() * 50 + b"caf\xe9 and \xff\xfe bytes " + PROSE.encode() * 50)
    [document] = read(path)
    assert document.replaced_bytes == 3
    assert "caf\ufffd and \ufffd\ufffd bytes" in document.text
    assert document.text.count(PROSE) == 100

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Déjà vu à côté de la forêt. ".encode("latin-1") * 100)
    assert skip_reason(latin1) == "invalid_utf8"


@pytest.mark.parametrize("name", ["fake.txt", "fake.jsonl", "fake.csv", "fake.html", "fake.json.gz"])
def test_binary_disguised_as_text_is_skipped(tmp_path: Path, name: str) -> None:
    payload = b"looks like text at first\n" + bytes(range(256)) * 4
    path = tmp_path / name
    path.write_bytes(gzip.compress(payload) if name.endswith(".gz") else payload)
    assert skip_reason(path) == "binary"


def test_empty_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b" \n\n\t\n")
    (tmp_path / "empty.md.gz").write_bytes(gzip.compress(b""))
    for path in sorted(tmp_path.iterdir()):
        assert skip_reason(path) == "empty_file", path


def test_jsonl_bad_lines_are_rejected_with_file_and_line_and_the_rest_is_kept(tmp_path: Path) -> None:
    lines = [
        b'{"text": "first document"}',
        b'{"text": "broken',
        b'{"text": "caf\xe9 in latin-1"}',
        b"",
        b"[1, 2, 3]",
        b'{"body": "no text field"}',
        b'{"text": 42}',
        b'{"text": null}',
        b'{"meta": {"text": "nested"}, "text": "top level wins"}',
        b'{"text": "last document, no final newline"}',
    ]
    path = tmp_path / "mixed.jsonl"
    content = b"\n".join(lines)
    path.write_bytes(content)

    documents = read(path, doc_id="src/mixed.jsonl")

    assert kept(documents) == ["first document", "top level wins", "last document, no final newline"]
    assert reasons(documents) == {
        "src/mixed.jsonl:2": "invalid_json",
        "src/mixed.jsonl:3": "invalid_utf8",
        "src/mixed.jsonl:5": "not_an_object",
        "src/mixed.jsonl:6": "missing_text_field",
        "src/mixed.jsonl:7": "text_not_a_string",
        "src/mixed.jsonl:8": "text_not_a_string",
    }
    by_line = {document.row: document for document in documents}
    assert by_line[2].detail.startswith(f"{path}:2: ")
    assert by_line[3].detail.startswith(f"{path}:3: ") and by_line[3].replaced_bytes == 1
    assert by_line[6].detail == f"{path}:6: no field `text`"
    assert by_line[2].text == '{"text": "broken'  # a rejected record keeps what was read
    for document in documents:  # offsets point at the start of each line
        assert content[document.offset :].startswith(lines[document.row - 1][:10])


def test_jsonl_nested_field_paths(tmp_path: Path) -> None:
    path = tmp_path / "nested.jsonl"
    path.write_text('{"meta": {"body": "inner text"}}\n{"meta": "flat"}\n', encoding="utf-8")
    documents = read(path, ReadOptions(text_field="meta.body"))
    assert kept(documents) == ["inner text"]
    assert reasons(documents) == {"nested.jsonl:2": "missing_text_field"}


def test_a_jsonl_line_over_the_limit_is_rejected_without_being_held(tmp_path: Path) -> None:
    path = tmp_path / "long_line.jsonl"
    long_text = "x" * (16 << 20)
    with open(path, "w", encoding="utf-8") as out:
        out.write('{"text": "before"}\n')
        out.write(json.dumps({"text": long_text}) + "\n")
        out.write('{"text": "after"}\n')
    del long_text
    options = ReadOptions(max_line_bytes=64 << 10)

    tracemalloc.start()
    documents = read(path, options)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert kept(documents) == ["before", "after"]
    assert reasons(documents) == {"long_line.jsonl:2": "line_too_long"}
    assert documents[1].detail.startswith(f"{path}:2: {(16 << 20) + 12} bytes")
    assert len(documents[1].text) == 1024  # only the start of the line is kept
    assert documents[2].offset == path.stat().st_size - len('{"text": "after"}\n')
    assert peak < 4 << 20  # a quarter of the line: it was never held whole


def jsonl_lines(count: int) -> list[bytes]:
    """Lines with random (incompressible) text, so a truncated archive still holds many of them."""
    return [json.dumps({"text": f"{n} {os.urandom(300).hex()}"}).encode() for n in range(count)]


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_compressed_files_read_like_plain_ones(tmp_path: Path, compression: str) -> None:
    lines = jsonl_lines(50)
    plain = tmp_path / "docs.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    packed = tmp_path / f"docs.jsonl{compression}"
    if compression == ".gz":
        packed.write_bytes(gzip.compress(plain.read_bytes()))
    else:  # several frames, one with a checksum, and a skippable frame between them
        half = len(plain.read_bytes()) // 2
        skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
        packed.write_bytes(
            zstandard.ZstdCompressor(write_checksum=True).compress(plain.read_bytes()[:half])
            + skippable
            + zstandard.ZstdCompressor().compress(plain.read_bytes()[half:])
        )
    strip = lambda documents: [(d.id.split(":")[1], d.text, d.offset, d.row) for d in documents]  # noqa: E731
    assert strip(read(packed)) == strip(read(plain))
    assert len(read(packed)) == 50


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_a_truncated_archive_keeps_what_came_before_and_ends_with_a_rejected_record(tmp_path: Path, compression: str) -> None:
    lines = jsonl_lines(6000)  # about 3.7 MB: several chunks before the break
    content = b"\n".join(lines) + b"\n"
    packed = gzip.compress(content) if compression == ".gz" else zstandard.ZstdCompressor().compress(content)
    path = tmp_path / f"cut.jsonl{compression}"
    path.write_bytes(packed[: int(len(packed) * 0.7)])

    documents = read(path)

    *good, last = documents
    assert 1000 < len(good) < 6000
    assert [document.text.encode() for document in good] == [json.loads(line)["text"].encode() for line in lines[: len(good)]]
    assert last.rejected_because == "corrupt_compressed" and last.text == ""
    assert last.id == f"cut.jsonl{compression}@{last.offset}" and last.offset > good[-1].offset

    small = tmp_path / f"small.txt{compression}"
    small.write_bytes((gzip.compress if compression == ".gz" else zstandard.ZstdCompressor().compress)(os.urandom(2000))[:500])
    assert skip_reason(small) == "corrupt_compressed"  # nothing read yet: the whole file is skipped
    not_packed = tmp_path / f"fake.md{compression}"
    not_packed.write_bytes(b"this was never compressed")
    assert skip_reason(not_packed) == "corrupt_compressed"


def test_a_highly_compressed_file_unpacks_a_chunk_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "bomb.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"a" * (64 << 20)))  # 64 MB in a few kB
    tracemalloc.start()
    count = sum(1 for _ in read_documents(path, "bomb", ReadOptions()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 64 and peak < 16 << 20


def test_csv_and_tsv_rows(tmp_path: Path) -> None:
    long_field = "long " * 40_000  # 200 kB: more than the csv module's default field limit
    path = tmp_path / "table.csv"
    content = (
        b"id,text,lang\n"
        b'1,"a quoted field, with a comma\nand a newline",en\n'
        b"2\n"
        b"\n"
        b"3,caf\xe9 in latin-1,fr\n"
        + f'4,"{long_field}",en\n'.encode()
        + b"5,last row,en\n"
    )
    path.write_bytes(content)

    documents = read(path, doc_id="table")

    assert kept(documents) == ["a quoted field, with a comma\nand a newline", long_field, "last row"]
    assert reasons(documents) == {"table:1": "missing_text_field", "table:2": "invalid_utf8"}
    assert [document.row for document in documents] == [0, 1, 2, 3, 4]
    assert documents[2].detail.startswith(f"{path}:6: ")  # the header is line 1; the quoted newline adds one
    assert content[documents[4].offset :].startswith(b"5,last row")

    tsv = tmp_path / "table.tsv.gz"
    tsv.write_bytes(gzip.compress(b"text\tlabel\nfirst, with a comma\t1\nsecond\t0\n"))
    assert kept(read(tsv)) == ["first, with a comma", "second"]

    no_column = tmp_path / "no_column.csv"
    no_column.write_text("id,body\n1,hello\n", encoding="utf-8")
    assert skip_reason(no_column) == "missing_text_field"


def test_a_csv_line_over_the_limit_is_rejected_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text\nshort one\n" + "y" * 300_000 + "\nshort two\n", encoding="utf-8")
    documents = read(path, ReadOptions(max_line_bytes=100_000))
    assert kept(documents) == ["short one", "short two"]
    assert reasons(documents) == {"long.csv:1": "line_too_long"}


def test_json_arrays_and_single_objects(tmp_path: Path) -> None:
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"text": "one"}, {"title": "no text"}, "a string", {"text": "four"}]), encoding="utf-8")
    documents = read(array)
    assert kept(documents) == ["one", "four"]
    assert reasons(documents) == {"records.json:1": "missing_text_field", "records.json:2": "not_an_object"}
    assert [document.row for document in documents] == [0, 1, 2, 3]

    single = tmp_path / "single.json.gz"
    single.write_bytes(gzip.compress(json.dumps({"text": "only one"}).encode()))
    assert [(document.id, document.text) for document in read(single)] == [("single.json.gz:0", "only one")]

    lines_in_disguise = tmp_path / "lines.json"
    lines_in_disguise.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(SkippedFile, match="name the file .jsonl"):
        read(lines_in_disguise)
    assert skip_reason(array, ReadOptions(max_file_bytes=40)) == "file_too_large"


def test_html_pages_are_extracted_whole(tmp_path: Path) -> None:
    page = "<html><head><title>skip me</title></head><body><p>First <b>para</b>.</p><p>Second.</p></body></html>"
    (tmp_path / "page.html").write_text(page, encoding="utf-8")
    (tmp_path / "page.htm.gz").write_bytes(gzip.compress(page.encode()))
    for name in ("page.html", "page.htm.gz"):
        [document] = read(tmp_path / name)
        assert (document.id, document.text, document.kind) == (name, "First para.\n\nSecond.", "html")
    assert skip_reason(tmp_path / "page.html", ReadOptions(html_method="builtin", max_file_bytes=50)) == "file_too_large"
    assert skip_reason(tmp_path / "page.htm.gz", ReadOptions(html_method="builtin", max_file_bytes=50)) == "file_too_large"


def test_parquet_rows_by_batches(tmp_path: Path) -> None:
    texts = [f"parquet row {n}" if n % 7 else None for n in range(2500)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), path, row_group_size=1000)

    documents = read(path, doc_id="rows")

    assert [document.id for document in documents] == [f"rows:{n}" for n in range(2500)]
    assert kept(documents) == [text for text in texts if text is not None]
    assert set(reasons(documents).values()) == {"text_not_a_string"}
    assert skip_reason(path, ReadOptions(text_field="body")) == "missing_text_field"
    assert skip_reason(path, ReadOptions(text_field="id")) == "text_not_a_string"
    (tmp_path / "fake.parquet").write_text("not parquet", encoding="utf-8")
    assert skip_reason(tmp_path / "fake.parquet") == "corrupt_file"


def test_datasets_folders(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": [f"example {n}" for n in range(30)], "label": list(range(30))})
    dataset.save_to_disk(str(tmp_path / "single"), num_shards=3)
    splits = datasets.DatasetDict({"train": dataset.select(range(5)), "test": dataset.select(range(5, 7))})
    splits.save_to_disk(str(tmp_path / "splits"))

    single = read(tmp_path / "single", doc_id="single")
    assert [(document.id, document.text) for document in single] == [(f"single:{n}", f"example {n}") for n in range(30)]
    assert {document.kind for document in single} == {"arrow"}
    both = read(tmp_path / "splits", doc_id="splits")
    assert [document.id for document in both] == [f"splits/train:{n}" for n in range(5)] + ["splits/test:0", "splits/test:1"]
    assert [document.text for document in both[5:]] == ["example 5", "example 6"]
    assert skip_reason(tmp_path / "single", ReadOptions(text_field="missing")) == "missing_text_field"

    assert is_dataset_folder(tmp_path / "single") and is_dataset_folder(tmp_path / "splits")
    assert not is_dataset_folder(tmp_path)
    (tmp_path / "loose.txt").write_text("a file next to them", encoding="utf-8")
    assert list_source_files(tmp_path) == [tmp_path / "loose.txt", tmp_path / "single", tmp_path / "splits"]


def test_listing_follows_symlinks_once_and_applies_globs(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "build").mkdir()
    for name in ("docs/a.md", "docs/deep/b.md", "docs/c.txt", "build/out.md", "top.md"):
        (root / name).write_text("text", encoding="utf-8")
    (root / "docs" / "deep" / "loop").symlink_to(root)  # a loop back to the top
    (root / "z_alias").symlink_to(root / "docs")  # the same folder twice: listed where first met
    (root / "z_same.md").symlink_to(root / "top.md")  # the same file twice

    everything = list_source_files(root)
    names = [path.relative_to(root).as_posix() for path in everything]
    assert names == ["build/out.md", "docs/a.md", "docs/c.txt", "docs/deep/b.md", "top.md"]

    markdown = list_source_files(root, include=["*.md"], exclude=["build"])
    assert [path.relative_to(root).as_posix() for path in markdown] == ["docs/a.md", "docs/deep/b.md", "top.md"]
    only_docs = list_source_files(root, include=["docs/*"], exclude=["*/deep/*"])
    assert [path.relative_to(root).as_posix() for path in only_docs] == ["docs/a.md", "docs/c.txt"]


def test_files_that_cannot_be_opened_are_skipped_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "does-not-exist.txt")
    (tmp_path / "self.txt").symlink_to(tmp_path / "self.txt")
    os.mkfifo(tmp_path / "pipe.txt")  # opening it would block forever
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "plain_folder").mkdir()

    listed = list_source_files(tmp_path)
    assert [path.name for path in listed] == ["dangling.txt", "image.png", "pipe.txt", "self.txt"]
    assert {path.name: skip_reason(path) for path in listed} == {
        "dangling.txt": "broken_symlink",
        "image.png": "unsupported_extension",
        "pipe.txt": "not_a_regular_file",
        "self.txt": "symlink_loop",
    }
    assert skip_reason(tmp_path / "plain_folder") == "not_a_regular_file"
    assert skip_reason(tmp_path / "missing.txt") == "unreadable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_files_and_folders(tmp_path: Path) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text(PROSE, encoding="utf-8")
    locked.chmod(0)
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "inside.txt").write_text(PROSE, encoding="utf-8")
    closed.chmod(0)
    try:
        assert list_source_files(tmp_path) == [closed, locked]
        assert skip_reason(locked) == "unreadable"
        assert skip_reason(closed) == "unreadable"
    finally:
        closed.chmod(0o755)
