"""The data stage on real files: every format, every way a file can be unusable, cleaning, cutting,
deduplication, the split, the stdlib corpus and the folder it all ends up in. The steps themselves
(filters, PII, dedup, extraction) have their own test files; this one tests them wired together."""

from __future__ import annotations

import gzip
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.artifacts import read_manifest
from lmforge.config import DataConfig
from lmforge.data.clean import clean_text, cut_into_pieces
from lmforge.data.extract import extract_html
from lmforge.data.stage import build_corpus, data_inputs, iter_documents, iter_rejected
from lmforge.data.stdlib_docs import collect_module_docs
from lmforge.errors import LmforgeError

PARAGRAPH = "A paragraph of plain prose that is long enough to be kept by the length filter. "


def paragraph(n: int) -> str:
    return f"Paragraph number {n}. " + PARAGRAPH * (1 + n % 3)


# The tests here use short, repetitive documents that the quality rules and near-dedup would rightly remove.
PLAIN_STEPS = {"quality": {"enabled": False}, "dedup": {"near": False}, "workers": 1}


def build(tmp_path: Path, sources: list, name: str = "out", **settings_) -> tuple[dict, Path]:
    config = DataConfig.model_validate({"sources": [str(source) for source in sources], **PLAIN_STEPS, **settings_})
    out_dir = tmp_path / name
    return build_corpus(config, out_dir, progress=False), out_dir


def all_documents(out_dir: Path) -> dict[str, dict]:
    return {record["id"]: record for split in ("train", "val") for record in iter_documents(out_dir, split)}


def assert_counts_add_up(report: dict) -> None:
    assert report["documents_after_cutting"] == report["kept"] + report["rejected_total"]
    assert report["rejected_total"] == sum(report["rejected"].values())
    assert report["kept"] == report["train_documents"] + report["val_documents"] + report["test_documents"]
    steps = {step["step"]: step for step in report["steps"]}
    for step in report["steps"]:  # every step: what came in either went out or was rejected with a reason
        if step["step"] != "cut":  # which turns one document into pieces
                step["documents_in"] == step["documents_out"] + sum(step["rejected"].values()), step
    chain = ["read", "extract", "normalize"]
    assert all(steps[a]["documents_out"] == steps[b]["documents_in"] for a, b in zip(chain, chain[1:]))
    chain = ["cut", "length", "language", "quality", "toxicity", "decontamination", "pii", "exact_dedup", "near_dedup", "split", "mix"]
    assert all(steps[a]["documents_out"] == steps[b]["documents_in"] for a, b in zip(chain, chain[1:]))
    assert steps["normalize"]["documents_out"] == steps["cut"]["documents_in"]
    assert steps["mix"]["documents_out"] == report["kept"]


@pytest.fixture
def mixed_corpus(tmp_path: Path) -> Path:
    """A folder with one file of every supported kind, compressed variants, and a file to ignore."""
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text(paragraph(1), encoding="utf-8")
    (folder / "sub" / "readme.md").write_text("# Title\n\n" + paragraph(2), encoding="utf-8")
    jsonl = [
        json.dumps({"body": paragraph(3), "other": 1}),
        "{this is not json",
        json.dumps({"text": "the wrong field " + PARAGRAPH}),
        "",
        json.dumps({"body": paragraph(4)}),
    ]
    (folder / "records.jsonl").write_text("\n".join(jsonl) + "\n", encoding="utf-8")
    (folder / "page.html").write_text(
        textwrap.dedent(
            f"""\
            <!DOCTYPE html>
            <html><head><title>Hidden title</title><style>body {{ color: red }}</style></head>
            <body><script>var hidden = "script text";</script>
            <h1>Visible heading</h1>
            <p>First   paragraph &amp; an entity, {PARAGRAPH}</p>
            <ul><li>item one</li><li>item two</li></ul>
            </body></html>
            """
        ),
        encoding="utf-8",
    )
    (folder / "zipped.txt.gz").write_bytes(gzip.compress(paragraph(5).encode("utf-8")))
    dump = "\n".join(json.dumps({"body": paragraph(n)}) for n in (6, 7)) + "\n"
    (folder / "dump.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(dump.encode("utf-8")))
    (folder / "page.htm.zst").write_bytes(zstandard.ZstdCompressor().compress(f"<p>{paragraph(8)}</p>".encode("utf-8")))
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return folder


def test_every_format_and_compression_is_read(tmp_path: Path, mixed_corpus: Path) -> None:
    report, out_dir = build(tmp_path, [mixed_corpus], text_field="body", min_chars=20, extraction={"html": "builtin"})
    documents = all_documents(out_dir)
    texts = {doc_id.split("#")[0]: record["text"] for doc_id, record in documents.items()}

    assert texts["corpus/notes.txt"] == paragraph(1).strip()
    assert texts["corpus/sub/readme.md"].startswith("Title\n\n")  # Markdown markup stripped
    assert texts["corpus/records.jsonl:1"] == paragraph(3).strip()
    assert texts["corpus/records.jsonl:5"] == paragraph(4).strip()
    assert texts["corpus/zipped.txt.gz"] == paragraph(5).strip()
    assert texts["corpus/dump.jsonl.zst:2"] == paragraph(7).strip()
    assert texts["corpus/page.htm.zst"] == paragraph(8).strip()
    for record in documents.values():
        assert {"id", "text", "source", "chars", "language", "language_score"} <= set(record)
        assert record["chars"] == len(record["text"]) and record["language"] == "en"
    # Provenance: the line of a JSONL record, the byte offset where a text starts.
    assert documents["corpus/records.jsonl:5#0"]["row"] == 5 and documents["corpus/records.jsonl:5#0"]["source"].endswith("records.jsonl")
    assert documents["corpus/notes.txt#0"]["offset"] == 0

    html = texts["corpus/page.html"]
    assert html.startswith("Visible heading\n\nFirst paragraph & an entity, A paragraph")
    assert html.endswith("item one\nitem two")
    for hidden in ("Hidden title", "color: red", "script text", "<", ">"):
        assert hidden not in html

    rejected = {record["id"]: record for record in iter_rejected(out_dir)}
    assert rejected["corpus/records.jsonl:2"]["reason"] == "invalid_json"
    assert rejected["corpus/records.jsonl:2"]["text"] == "{this is not json"
    assert rejected["corpus/records.jsonl:3"]["reason"] == "missing_text_field"
    assert [(item["path"], item["reason"]) for item in report["skipped_files"]] == [
        (str(mixed_corpus / "picture.png"), "unsupported_extension")
    ]
    assert report["files_read"] == 7
    assert report["documents_read"] == 11  # 4 text/HTML files, 5 JSONL records (blank line excluded), 2 in dump
    assert_counts_add_up(report)


def test_html_to_text_keeps_structure_and_drops_markup() -> None:
    html = (
        "<html><head><title>t</title><script>x = 1 < 2</script></head><body>"
        "<div>one <b>bold</b>\n   word</div><p>two<br>three</p><pre>  keep\n    indent</pre>"
        "<table><tr><td>a</td><td>b</td></tr></table><!-- comment --></body></html>"
    )
    assert clean_text(extract_html(html, "builtin")) == "one bold word\n\ntwo\nthree\n\n  keep\n    indent\n\na\tb"


def test_unusable_files_are_reported_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "messy"
    folder.mkdir()
    (folder / "good.txt").write_text(paragraph(1), encoding="utf-8")
    (folder / "binary.txt").write_bytes(b"text then \x00\x01\x02 binary" + bytes(range(256)))
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") + PARAGRAPH.encode("ascii"))
    (folder / "broken.txt.gz").write_bytes(b"this is not gzip at all")
    (folder / "truncated.txt.gz").write_bytes(gzip.compress(os.urandom(4000).hex().encode())[:500])
    (folder / "truncated.md.zst").write_bytes(zstandard.ZstdCompressor().compress(os.urandom(4000).hex().encode())[:500])
    (folder / "dangling.txt").symlink_to(folder / "does-not-exist.txt")
    os.mkfifo(folder / "pipe.txt")  # opening it would block forever
    locked = folder / "locked.txt"
    locked.write_text(paragraph(2), encoding="utf-8")
    locked.chmod(0)

    report, out_dir = build(tmp_path, [folder])

    reasons = {Path(item["path"]).name: item["reason"] for item in report["skipped_files"]}
    assert reasons["binary.txt"] == "binary"
    assert reasons["latin1.txt"] == "invalid_utf8"
    assert reasons["broken.txt.gz"] == "corrupt_compressed"
    assert reasons["truncated.txt.gz"] == "corrupt_compressed"
    assert reasons["truncated.md.zst"] == "corrupt_compressed"
    assert reasons["dangling.txt"] == "broken_symlink"
    assert reasons["pipe.txt"] == "not_a_regular_file"
    if os.access(locked, os.R_OK):  # root reads anything: the permission check cannot be exercised
        assert "locked.txt" not in reasons
    else:
        assert reasons["locked.txt"] == "unreadable"
    assert report["files_skipped"] == len(report["skipped_files"])
    assert sum(report["files_skipped_by_reason"].values()) == report["files_skipped"]
    assert "messy/good.txt#0" in all_documents(out_dir)


def test_a_large_file_is_cut_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = [paragraph(n).strip() for n in range(60)]
    long_paragraph = "\n".join(f"line {n} of a paragraph without blank lines, " * 2 for n in range(20))
    long_line = " ".join(f"word{n}" for n in range(200))
    text = "\n\n".join(paragraphs[:30] + [long_paragraph, long_line] + paragraphs[30:])
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")

    report, out_dir = build(tmp_path, [tmp_path / "big.txt"], max_doc_chars=300, min_chars=0, val_fraction=0.0,
                            language={"enabled": False})  # the word lists in it are no language

    pieces = [record["text"] for record in iter_documents(out_dir, "train")]
    ids = [record["id"] for record in iter_documents(out_dir, "train")]
    assert ids == [f"big.txt#{n}" for n in range(len(pieces))]
    assert report["documents_read"] == 1 and report["documents_after_cutting"] == len(pieces) > 30
    assert all(len(piece) <= 300 for piece in pieces)
    # Paragraphs are never split: each one is whole inside exactly one piece.
    for whole in paragraphs:
        assert sum(whole in piece for piece in pieces) == 1
    assert "".join(text.split()) == "".join("".join(pieces).split())


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("ab \n\r\t\x07e\u0301"), max_size=3000), max_chars=st.integers(8, 400))
def test_cut_pieces_fit_and_lose_nothing(text: str, max_chars: int) -> None:
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned
    pieces = cut_into_pieces(cleaned, max_chars)
    assert all(len(piece) <= max_chars for piece in pieces)
    assert "".join(cleaned.split()) == "".join("".join(pieces).split())
    if cleaned:
        assert all(piece.strip() for piece in pieces)


def test_clean_text_normalises() -> None:
    decomposed = "Cafe\u0301"
    assert clean_text(decomposed) == "Caf\u00e9"
    assert clean_text("a\x07b\x1b[0mc\x7f\td\u0085e") == "ab[0mc\tde"
    assert clean_text("one\r\ntwo\rthree   \n\n\n\n\n\nfour\t \n") == "one\ntwo\nthree\n\n\nfour"
    assert clean_text("\n\n  indented\n\n") == "  indented"
    assert clean_text("lone \ud800 surrogate") == "lone  surrogate"


def test_cleaning_and_exact_dedup_through_the_stage(tmp_path: Path) -> None:
    folder = tmp_path / "dups"
    folder.mkdir()
    body = "Caf\u00e9 society. " + PARAGRAPH
    (folder / "a.txt").write_text(body, encoding="utf-8")
    # Same text once cleaned: decomposed accent, CRLF, a control character, trailing spaces.
    (folder / "b.txt").write_bytes(("Cafe\u0301 soci\x07ety. " + PARAGRAPH + "   \r\n\r\n").encode("utf-8"))
    records = [json.dumps({"text": body}), json.dumps({"text": "short"})]
    (folder / "c.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")

    report, out_dir = build(tmp_path, [folder])

    documents = all_documents(out_dir)
    assert list(documents) == ["dups/a.txt#0"]
    assert documents["dups/a.txt#0"]["text"] == body.strip()
    rejected = {record["id"]: record for record in iter_rejected(out_dir)}
    assert rejected["dups/b.txt#0"]["reason"] == "duplicate"
    assert rejected["dups/b.txt#0"]["duplicate_of"] == "dups/a.txt#0"
    assert rejected["dups/c.jsonl:1#0"]["duplicate_of"] == "dups/a.txt#0"
    assert rejected["dups/c.jsonl:2#0"]["reason"] == "too_short"
    assert report["rejected"] == {"duplicate": 2, "too_short": 1}
    assert_counts_add_up(report)


def many_documents_file(path: Path, count: int) -> Path:
    lines = (json.dumps({"text": f"Document {n}: " + PARAGRAPH}) for n in range(count))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in sorted(out_dir.rglob("*.jsonl.gz"))}


def test_builds_are_byte_identical(tmp_path: Path, mixed_corpus: Path) -> None:
    sources = [many_documents_file(tmp_path / "many.jsonl", 300), mixed_corpus]
    first_report, first = build(tmp_path, sources, name="first", shard_docs=100)
    second_report, second = build(tmp_path, sources, name="second", shard_docs=100)
    assert shard_bytes(first) == shard_bytes(second)
    assert first_report["train_shards"] == ["train-00000.jsonl.gz", "train-00001.jsonl.gz", "train-00002.jsonl.gz"]
    assert read_manifest(first, "data")["fingerprint"] == read_manifest(second, "data")["fingerprint"]


def test_split_fraction_is_respected(tmp_path: Path) -> None:
    report, out_dir = build(tmp_path, [many_documents_file(tmp_path / "many.jsonl", 2000)], val_fraction=0.2)
    assert report["kept"] == 2000
    assert 0.17 < report["val_documents"] / 2000 < 0.23
    assert_counts_add_up(report)
    train_ids = {record["id"] for record in iter_documents(out_dir, "train")}
    val_ids = {record["id"] for record in iter_documents(out_dir, "val")}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 2000


@pytest.mark.parametrize("val_fraction", [1e-9, 0.999999])
def test_neither_split_is_ever_empty(tmp_path: Path, val_fraction: float) -> None:
    report, _ = build(tmp_path, [many_documents_file(tmp_path / "few.jsonl", 3)], val_fraction=val_fraction)
    assert report["train_documents"] >= 1 and report["val_documents"] >= 1


def test_a_single_document_goes_to_train(tmp_path: Path) -> None:
    report, _ = build(tmp_path, [many_documents_file(tmp_path / "one.jsonl", 1)], val_fraction=0.5)
    assert (report["train_documents"], report["val_documents"], report["val_shards"]) == (1, 0, [])


def test_nothing_left_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tiny.txt").write_text("too short", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"no documents left after filtering: 1 documents read .*too_short 1") as error:
        build(tmp_path, [tmp_path / "tiny.txt"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match="no documents left"):
        build(tmp_path, [empty])


def test_missing_and_unknown_sources_are_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="data source not found: .*nowhere"):
        build(tmp_path, [tmp_path / "nowhere"])
    with pytest.raises(LmforgeError, match="unknown data source `stdlib:everything`"):
        build(tmp_path, ["stdlib:everything"])
    with pytest.raises(LmforgeError, match="data source not found"):
        data_inputs(DataConfig(sources=[str(tmp_path / "nowhere")]))


def test_stdlib_topics_round_trip(tmp_path: Path, capfd) -> None:
    report, out_dir = build(tmp_path, ["stdlib:topics"], max_doc_chars=4000, val_fraction=0.1)
    assert capfd.readouterr().err == ""  # progress=False is silent
    assert report["kept"] > 50 and report["val_documents"] > 0
    assert_counts_add_up(report)
    manifest = read_manifest(out_dir, "data")
    assert manifest["stats"] == report == json.loads((out_dir / "report.json").read_text())
    assert manifest["inputs"] == data_inputs(DataConfig(sources=["stdlib:topics"]))
    documents = all_documents(out_dir)
    assert len(documents) == report["kept"]
    assert all(len(record["text"]) <= 4000 for record in documents.values())
    assert documents["stdlib/topic/assert#0"]["source"] == "stdlib:topic assert"
    # The manifest is the last thing written: every other file is older or as old.
    newest = max(path.stat().st_mtime_ns for path in out_dir.rglob("*") if path.is_file() and path.name != "manifest.json")
    assert (out_dir / "manifest.json").stat().st_mtime_ns >= newest


def test_iter_documents_needs_a_finished_folder(tmp_path: Path) -> None:
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(LmforgeError, match="incomplete"):
        iter_documents(tmp_path / "unfinished", "train")
    with pytest.raises(LmforgeError, match="no data artifact"):
        iter_documents(tmp_path / "absent", "train")
    _, out_dir = build(tmp_path, ["stdlib:topics"])
    with pytest.raises(LmforgeError, match="unknown data split"):
        iter_documents(out_dir, "dev")


def test_data_inputs_follow_the_files(tmp_path: Path, mixed_corpus: Path) -> None:
    config = DataConfig(sources=[str(mixed_corpus), "stdlib"])
    before = data_inputs(config)
    assert before == data_inputs(config)
    (mixed_corpus / "notes.txt").write_text(paragraph(1) + " changed", encoding="utf-8")
    after = data_inputs(config)
    assert after[str(mixed_corpus)] != before[str(mixed_corpus)]
    assert after["stdlib"] == before["stdlib"]


def test_full_stdlib_corpus(tmp_path: Path) -> None:
    report, out_dir = build(tmp_path, ["stdlib"], name="first")
    assert report["kept"] > 500
    assert report["train_chars"] + report["val_chars"] > 1_500_000
    documents = all_documents(out_dir)
    json_doc = documents["stdlib/module/json#0"]["text"]
    assert json_doc.startswith("Module json\n\nJSON (JavaScript Object Notation)")
    assert "\n\njson.dumps(obj, *, skipkeys=False, ensure_ascii=True," in json_doc
    assert "\n\nclass json.decoder.JSONDecoder(*, object_hook=None," in documents["stdlib/module/json.decoder#0"]["text"]
    assert "stdlib/module/email.mime.text#0" in documents
    assert "stdlib/module/concurrent.futures.thread#0" in documents
    excluded = ("stdlib/module/test.", "stdlib/module/idlelib", "stdlib/module/_", "stdlib/module/this#")
    assert not any(doc_id.startswith(excluded) for doc_id in documents)
    every_text = "\n".join(record["text"] for record in documents.values())
    for leak in (" at 0x", os.environ.get("HOME", "/root") + "/", sys.executable):
        assert leak not in every_text

    # Imports, signatures and hash-ordered reprs come out the same on every run.
    _, second_dir = build(tmp_path, ["stdlib"], name="second")
    assert shard_bytes(out_dir) == shard_bytes(second_dir)


FAKE_WORKER = """
import json, sys, time
skip = set(sys.argv[1:])
def emit(record):
    print(json.dumps(record), flush=True)
for name in ["alpha", "crashes", "hangs", "omega"]:
    if name in skip:
        continue
    emit({"start": name})
    if name == "crashes":
        sys.exit(3)
    if name == "hangs":
        time.sleep(60)
    emit({"module": name, "text": "doc of " + name})
emit({"finished": True})
"""


def test_a_module_that_kills_or_hangs_the_worker_is_skipped(tmp_path: Path) -> None:
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER, encoding="utf-8")
    docs = collect_module_docs(worker_script=worker, silence_limit_seconds=1.0)
    assert docs.documents == [("alpha", "doc of alpha"), ("omega", "doc of omega")]
    assert [failure["module"] for failure in docs.failed] == ["crashes", "hangs"]
    assert "status 3" in docs.failed[0]["error"] and "hung" in docs.failed[1]["error"]
