"""`lmforge data inspect`: tables, samples per reason, data cards, on a folder the real pipeline built."""

from __future__ import annotations

import gzip
import json
import random
import re

import pytest

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.inspect import ELLIPSIS, Reservoir, excerpt
from lmforge.data.stage import build_corpus

WORDS = ("the of and to in that with for on at from by about over under after before through between water garden river "
         "morning window letter kitchen winter village teacher market bridge station summer forest doctor orchard harbour "
         "lantern meadow library evening mountain bread music friend street table history careful quiet bright early "
         "gentle heavy narrow ancient simple walked carried opened noticed remembered painted followed built watched "
         "promised gathered wrote found listened answered children travellers farmers neighbours students sailors").split()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert('card')</script>"


def english_paragraph(rng: random.Random, number: int) -> str:
    """About a hundred English words in random order: passes the quality rules, and no two paragraphs are alike."""
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "." for _ in range(9)]
    return f"Paragraph {number}. " + " ".join(sentences)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder built by the real pipeline from files with planted problems, so several reasons appear."""
    rng = random.Random(7)
    source = tmp_path_factory.mktemp("sources")
    paragraphs = [english_paragraph(rng, number) for number in range(40)]
    (source / "prose.txt").write_text(paragraphs[0] + "\n", encoding="utf-8")
    near_copy = paragraphs[25].split(" ")
    near_copy[40] = "lighthouse"  # one word of about a hundred: Jaccard of the 5-word shingles near 0.9
    texts = [*paragraphs[1:], paragraphs[3], " ".join(near_copy), "Too short.",
             "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer aus der alten Scheune zuschaut. "
             "Es ist ein schöner Tag im Frühling, die Vögel singen in den Bäumen, und die Kinder spielen bis zum Abend "
             "draußen auf der großen Wiese hinter dem Haus.",
             SCRIPT + " " + " ".join("#### $$$ ..." for _ in range(40)),
             "\n".join(["Buy cheap watches and the best bags from our shop today."] * 20)]  # junk: one line, repeated
    lines = [json.dumps({"text": text}) for text in texts]
    lines.insert(10, '{"text": "a bad line, the JSON is never closed')
    (source / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (source / "blob.txt").write_bytes(b"\x00\x01binary" * 100)
    out = tmp_path_factory.mktemp("run") / "data"
    build_corpus(DataConfig(sources=[str(source)], workers=1, val_fraction=0.1), out, progress=False)
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["data", "inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rejected_records(data_dir) -> list[dict]:
    records = []
    for shard in sorted((data_dir / "rejected").glob("rejected-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as lines:
            records += [json.loads(line) for line in lines]
    return records


def kept_ids(data_dir) -> set[str]:
    ids = set()
    for shard in data_dir.glob("*-*.jsonl.gz"):
        with gzip.open(shard, "rt", encoding="utf-8") as lines:
            ids |= {json.loads(line)["id"] for line in lines}
    return ids


def test_the_report_is_printed_as_tables_with_every_step(data_dir, capsys):
    report = json.loads((data_dir / "report.json").read_text())
    code, out, err = run_cli(capsys, data_dir.parent, "--samples", "0")  # a run folder: its data/ is read
    assert code == 0, err
    for step in report["steps"]:
        row = re.search(rf"^\s+{step['step']}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)", out, re.MULTILINE)
        assert row, f"no row for step {step['step']}"
        assert [int(value.replace(",", "")) for value in row.groups()] == [
            step["documents_in"], step["documents_out"], sum(step["rejected"].values())]
    for section in ("steps", "splits", "mix", "languages (top 10)", "deduplication"):
        assert re.search(rf"^{re.escape(section)}$", out, re.MULTILINE), section
    assert f"exact duplicates removed: {report['dedup']['exact_removed']}" in out
    assert "documents after cutting: each one accounted for" in out
    assert "samples" not in out


def test_samples_cover_kept_documents_and_every_rejection_reason(data_dir, capsys):
    records = rejected_records(data_dir)
    reasons = {record["reason"] for record in records}
    assert {"invalid_json", "binary", "too_short", "language_not_kept", "duplicate", "near_duplicate"} <= reasons, reasons
    assert any(reason.startswith("quality_") for reason in reasons), reasons
    code, out, err = run_cli(capsys, data_dir, "--json", "--samples", "2", "--chars", "40")
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    by_reason: dict[str, list[dict]] = {}
    for sample in samples:
        by_reason.setdefault(sample.get("reason") if sample["kind"] == "rejected" else "kept", []).append(sample)
    assert set(by_reason) == reasons | {"kept"}
    ids_of = {record["id"]: record for record in records}
    for reason, found in by_reason.items():
        available = len(kept_ids(data_dir)) if reason == "kept" else sum(record["reason"] == reason for record in records)
        assert len(found) == min(2, available), reason
        for sample in found:
            assert len(sample["text"]) <= 40 + len(ELLIPSIS)
            if reason != "kept":
                assert sample["id"] in ids_of and ids_of[sample["id"]]["reason"] == reason
                assert ids_of[sample["id"]]["text"].startswith(sample["text"].removesuffix(ELLIPSIS))
    assert all(sample["id"] in kept_ids(data_dir) and sample["split"] in ("train", "val") for sample in by_reason["kept"])
    # The same seed shows the same documents; the tables show them too.
    assert run_cli(capsys, data_dir, "--json", "--samples", "2", "--chars", "40")[1] == out
    code, out, _ = run_cli(capsys, data_dir, "--samples", "2")
    for reason in reasons:
        assert re.search(rf"^  rejected: {reason} \(\d+ of [\d,]+\)$", out, re.MULTILINE), reason
    assert re.search(r"^  kept documents \(2 of [\d,]+\)$", out, re.MULTILINE)


def test_the_reason_filter_and_the_kept_and_rejected_switches(data_dir, capsys):
    code, out, err = run_cli(capsys, data_dir, "--json", "--reason", "too_short", "--reason", "duplicate", "--samples", "5")
    assert code == 0, err
    samples = [json.loads(line) for line in out.splitlines()]
    expected = [record["id"] for record in rejected_records(data_dir) if record["reason"] in ("too_short", "duplicate")]
    assert sorted(sample["id"] for sample in samples) == sorted(expected)  # fewer than 5 each: all of them, once
    assert {sample["kind"] for sample in samples} == {"rejected"}
    kept = [json.loads(line) for line in run_cli(capsys, data_dir, "--json", "--kept-only")[1].splitlines()]
    assert len(kept) == 3 and {sample["kind"] for sample in kept} == {"kept"}
    rejected = [json.loads(line) for line in run_cli(capsys, data_dir, "--json", "--rejected-only")[1].splitlines()]
    assert rejected and {sample["kind"] for sample in rejected} == {"rejected"}
    code, out, err = run_cli(capsys, data_dir, "--reason", "too_shrot")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "did you mean `too_short`?" in err


@pytest.mark.parametrize("suffix", [".md", ".html"])
def test_the_data_card_has_every_section_and_the_length_histogram(data_dir, tmp_path, capsys, suffix):
    card = tmp_path / "cards" / f"corpus{suffix}"
    code, out, err = run_cli(capsys, data_dir, "--card", card, "--samples", "2")
    assert code == 0, err
    histogram = tmp_path / "cards" / "corpus-lengths.png"
    assert f"card: {card} and {histogram}" in out
    assert histogram.read_bytes().startswith(PNG_SIGNATURE) and histogram.stat().st_size > 2000
    text = card.read_text(encoding="utf-8")
    for section in ("Sources", "Sizes", "Steps", "Files skipped", "Languages", "Document lengths", "Deduplication", "Mix",
                    "Sample documents", "Recipe"):
        assert (f"## {section}" if suffix == ".md" else f"<h2>{section}</h2>") in text, section
    report = json.loads((data_dir / "report.json").read_text())
    for step in report["steps"]:
        assert step["step"] in text
    for reason in {record["reason"] for record in rejected_records(data_dir)}:
        assert f"rejected: {reason} (" in text, reason
    assert "min_chars: 64" in text  # the recipe's data section, from manifest.json
    if suffix == ".md":
        assert "![kept documents by length in characters](corpus-lengths.png)" in text
    else:
        assert text.count("<script") == 0 and "&lt;script&gt;" in text
        assert 'src="data:image/png;base64,' in text


def test_a_missing_or_incomplete_folder_is_one_line_error(tmp_path, capsys, data_dir):
    code, out, err = run_cli(capsys, tmp_path / "nowhere")
    assert (code, out) == (2, "") and err == f"error: no such folder: {tmp_path / 'nowhere'}\n"
    (tmp_path / "half").mkdir()
    code, out, err = run_cli(capsys, tmp_path / "half")
    assert code == 2 and err.startswith("error: ") and "incomplete" in err and err.count("\n") == 1
    code, out, err = run_cli(capsys, data_dir, "--card", tmp_path / "card.pdf")
    assert code == 2 and err.count("\n") == 1 and ".md" in err


def test_excerpts_are_cut_with_an_ellipsis_and_escape_control_characters():
    assert excerpt("abcdef", 3) == "abc" + ELLIPSIS
    assert excerpt("abc", 3) == "abc"
    assert excerpt("a\nb\tc\x1b[2Jd\u202ee", 0) == "a\\nb\\tc\\x1b[2Jd\\u202ee"
    assert excerpt("a\nb\x07", 0, keep_newlines=True) == "a\nb\\x07"


def test_the_reservoir_samples_uniformly():
    # Each of 10 items should be chosen in 3 of 10 draws; 20,000 draws put every frequency near 0.3.
    hits = [0] * 10
    rng = random.Random(0)
    for _ in range(20_000):
        reservoir = Reservoir(3, rng)
        for item in range(10):
            reservoir.offer(item)
        for item in reservoir.items:
            hits[item] += 1
    assert all(abs(count / 20_000 - 0.3) < 0.015 for count in hits), hits
