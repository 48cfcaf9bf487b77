"""The data pipeline as a whole: workers, cluster tasks and their merge, resumption after a kill, near-duplicate
clusters, mixing, stratified splits, decontamination and broken inputs, all through `build_corpus` or the CLI
on documents made from real text (the pydoc topics every Python install has)."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydoc_data.topics import topics

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.stage import build_corpus, iter_documents, iter_rejected


def prose_paragraphs(minimum_words: int = 60) -> list[str]:
    """Paragraphs of real English documentation prose, long enough for the quality rules, in a fixed order."""
    found = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            text = " ".join(paragraph.split())
            if len(text.split()) >= minimum_words and text[0].isalpha() and not text.startswith(("Changed", "New in")):
                found.append(text)
    return list(dict.fromkeys(found))


PARAGRAPHS = prose_paragraphs()


def write_jsonl(path: Path, texts: list[str], **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text, **extra}) + "\n" for text in texts), encoding="utf-8")
    return path


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in sorted(out_dir.rglob("*.jsonl.gz"))}


def kept_records(out_dir: Path) -> list[dict]:
    return [record for split in ("train", "val", "test") for record in iter_documents(out_dir, split)]


def edited(text: str, changes: int) -> str:
    """A near-copy: `changes` words, evenly spaced, replaced (in a 120-word text, 2 changes leave a 5-word-shingle
    Jaccard similarity of about 0.85)."""
    words = text.split()
    step = len(words) // (changes + 1)
    return " ".join("changed" if index % step == step // 2 and index // step < changes else word for index, word in enumerate(words))


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def shingles(text: str) -> set:
        words = text.lower().split()
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


NEAR_A, NEAR_B = 31, 67  # paragraphs of 120 words or more


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Several files of real prose, with planted exact and near duplicates across files."""
    folder = tmp_path_factory.mktemp("corpus")
    assert len(PARAGRAPHS) > 150
    for index in range(6):
        write_jsonl(folder / f"part-{index}.jsonl", PARAGRAPHS[index * 25 : (index + 1) * 25])
    write_jsonl(folder / "z-copies.jsonl", [PARAGRAPHS[3], PARAGRAPHS[3].upper(), edited(PARAGRAPHS[NEAR_A], 1),
                                          edited(PARAGRAPHS[NEAR_A], 2), edited(PARAGRAPHS[NEAR_B], 1), edited(PARAGRAPHS[NEAR_B], 12)])
    return folder


def config_for(sources, **settings) -> DataConfig:
    sources = [source if isinstance(source, dict) else str(source) for source in sources]
    return DataConfig.model_validate({"sources": sources, "shard_mb": 0.01, "workers": 1,
                                      "val_fraction": 0.1, **settings})


def test_two_workers_and_one_write_the_same_bytes(tmp_path: Path, corpus: Path) -> None:
    one = build_corpus(config_for([corpus]), tmp_path / "one", progress=False)
    two = build_corpus(config_for([corpus], workers=2), tmp_path / "two", progress=False)
    assert one["shards"] == two["shards"] >= 7
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert not (tmp_path / "one" / "work").exists()  # removed once the folder is complete


def test_near_duplicate_clusters_keep_exactly_one(tmp_path: Path, corpus: Path) -> None:
    report = build_corpus(config_for([corpus]), tmp_path / "out", progress=False)
    kept = {record["text"] for record in kept_records(tmp_path / "out")}
    # Each planted cluster keeps exactly one member: the first in reading order.
    assert PARAGRAPHS[3] in kept and PARAGRAPHS[3].upper() not in kept
    near_a, near_b = PARAGRAPHS[NEAR_A], PARAGRAPHS[NEAR_B]
    assert shingle_jaccard(near_a, edited(near_a, 2)) > 0.8 and shingle_jaccard(near_b, edited(near_b, 12)) < 0.5
    assert near_a in kept and edited(near_a, 1) not in kept and edited(near_a, 2) not in kept
    assert near_b in kept and edited(near_b, 1) not in kept
    assert edited(near_b, 12) in kept  # too different to be a near-duplicate
    rejected = {record["text"]: record for record in iter_rejected(tmp_path / "out")}
    assert rejected[PARAGRAPHS[3].upper()]["reason"] == "duplicate"  # exact once case and punctuation are folded
    near = rejected[edited(near_a, 2)]
    assert near["reason"] == "near_duplicate" and near["duplicate_of"] == f"{corpus.name}/part-1.jsonl:{NEAR_A - 25 + 1}#0"
    assert report["dedup"]["exact_removed"] == 1 + 1  # the verbatim copy and the upper-cased one
    assert report["dedup"]["near_removed"] == 3
    steps = {step["step"]: step for step in report["steps"]}
    assert report["kept"] == steps["exact_dedup"]["documents_in"] - 5 and report["dedup"]["clusters"]["clusters"] == 3


def test_tasks_and_merge_equal_one_process(tmp_path: Path, corpus: Path) -> None:
    config = config_for([corpus])
    build_corpus(config, tmp_path / "single", progress=False)
    for task in (2, 0):
        summary = build_corpus(config, tmp_path / "split", progress=False, task=(task, 3))
        assert summary["shards"] >= 2 and not (tmp_path / "split" / "manifest.json").exists()
    with pytest.raises(Exception, match=r"work shards are not finished"):
        build_corpus(config, tmp_path / "split", progress=False, merge_only=True)
    build_corpus(config, tmp_path / "split", progress=False, task=(1, 3))
    build_corpus(config, tmp_path / "split", progress=False, merge_only=True)
    assert shard_bytes(tmp_path / "single") == shard_bytes(tmp_path / "split")
    assert json.loads((tmp_path / "single" / "manifest.json").read_text())["fingerprint"] == \
        json.loads((tmp_path / "split" / "manifest.json").read_text())["fingerprint"]


def test_the_cli_runs_tasks_then_the_merge(tmp_path: Path, corpus: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: cluster\ndata:\n  sources: [{corpus}]\n  shard_mb: 0.01\n  workers: 1\n", encoding="utf-8")
    common = [str(recipe), "--workdir", str(tmp_path), "--quiet"]
    assert main(["data", *common, "--task", "0", "--tasks", "2"]) == 0
    assert "task 0 of 2 finished" in capsys.readouterr().out
    assert main(["data", *common, "--merge"]) == 2
    assert "not finished" in capsys.readouterr().err
    assert main(["data", *common, "--task", "1", "--tasks", "2"]) == 0
    assert main(["data", *common, "--merge"]) == 0
    assert "data: merged; " in capsys.readouterr().out
    assert main(["data", *common, "--task", "2", "--tasks", "2"]) == 2
    assert "--task must be in 0..1" in capsys.readouterr().err
    # Once the folder is complete, a late task or a second merge changes nothing.
    manifest = (tmp_path / "cluster" / "data" / "manifest.json").read_bytes()
    assert main(["data", *common, "--merge"]) == 0 and "up to date" in capsys.readouterr().out
    assert main(["data", *common, "--task", "1", "--tasks", "2"]) == 0 and "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "cluster" / "data" / "manifest.json").read_bytes() == manifest


def test_recipe_paths_in_mappings_resolve_against_the_recipe(tmp_path: Path, capsys) -> None:
    write_jsonl(tmp_path / "docs" / "a.jsonl", PARAGRAPHS[:5])
    (tmp_path / "words.txt").write_text("# mine\nstatement\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: rel\ndata:\n  sources: [{path: docs, weight: 2}]\n  workers: 1\n"
                      "  toxicity: {enabled: true, packaged_list: false, word_lists: [words.txt]}\n", encoding="utf-8")
    assert main(["data", str(recipe), "--workdir", str(tmp_path / "runs"), "--quiet"]) == 0, capsys.readouterr().err
    recipe.write_text("name: rel\ndata:\n  sources: [{path: docs, wieght: 2}]\n", encoding="utf-8")
    assert main(["data", str(recipe), "--workdir", str(tmp_path / "runs")]) == 2
    assert "unknown key `data.sources.0.wieght`; did you mean `data.sources.0.weight`?" in capsys.readouterr().err


def test_edited_word_lists_and_dataset_folders_make_the_data_stale(tmp_path: Path) -> None:
    from lmforge.data.stage import data_inputs

    train = write_jsonl(tmp_path / "train.jsonl", PARAGRAPHS[:10])
    words = tmp_path / "words.txt"
    words.write_text("zebra\n", encoding="utf-8")
    config = config_for([train], toxicity={"enabled": True, "packaged_list": False, "word_lists": [str(words)], "max_fraction": 0.0})
    before = data_inputs(config)
    first = build_corpus(config, tmp_path / "first", progress=False)
    assert "toxic" not in first["rejected"]
    words.write_text("object\n", encoding="utf-8")
    assert data_inputs(config) != before
    second = build_corpus(config, tmp_path / "second", progress=False)  # same process: nothing stale is reused
    listed = sum(re.search(r"\bobject\b", text, re.I) is not None for text in PARAGRAPHS[:10])
    assert second["rejected"]["toxic"] == listed > 0

    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": PARAGRAPHS[:3]}).save_to_disk(str(folder))
    config = config_for([folder])
    before = data_inputs(config)
    datasets.Dataset.from_dict({"text": PARAGRAPHS[:4]}).save_to_disk(str(tmp_path / "other"))
    for item in (tmp_path / "other").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    assert data_inputs(config) != before


def test_a_truncated_archive_keeps_every_document_before_the_break(tmp_path: Path) -> None:
    import zlib

    lines = [json.dumps({"text": PARAGRAPHS[index % 100] + f" Copy {index}."}) for index in range(3000)]
    packed = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"))[: -len(lines) * 30]  # cut well inside the data
    (tmp_path / "cut.jsonl.gz").write_bytes(packed)
    recoverable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(packed).count(b"\n")
    settings = {"language": {"enabled": False}, "quality": {"enabled": False}, "dedup": {"near": False, "exact": False}}
    report = build_corpus(config_for([tmp_path / "cut.jsonl.gz"], **settings), tmp_path / "out", progress=False)
    assert report["steps"][0]["documents_in"] - report["rejected"]["corrupt_compressed"] >= recoverable > 1000
    (record,) = [record for record in iter_rejected(tmp_path / "out") if record["reason"] == "corrupt_compressed"]
    assert "truncated" in record["detail"]


def test_a_killed_build_resumes_byte_identical(tmp_path: Path, corpus: Path) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    build_corpus(config_for([corpus], shard_mb=0.002), uninterrupted, progress=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: killed\ndata:\n  sources: [{corpus}]\n  shard_mb: 0.002\n  workers: 1\n  val_fraction: 0.1\n",
                      encoding="utf-8")
    command = [sys.executable, "-m", "lmforge.cli", "data", str(recipe), "--workdir", str(tmp_path), "--quiet"]
    data = tmp_path / "killed" / "data"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (data / "work" / "shards" / "00002" / "done.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(path.parent.name for path in (data / "work" / "shards").glob("*/done.json"))
    assert len(finished) >= 3 and not (data / "manifest.json").exists()
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert shard_bytes(data) == shard_bytes(uninterrupted)


def test_mixing_weights_and_stratified_splits(tmp_path: Path) -> None:
    heavy = write_jsonl(tmp_path / "heavy.jsonl", PARAGRAPHS[:60])
    light = write_jsonl(tmp_path / "light.jsonl", PARAGRAPHS[60:150])
    sources = [{"path": str(heavy), "weight": 2.0}, {"path": str(light), "weight": 0.5}]
    every_document = {"language": {"enabled": False}, "quality": {"enabled": False}, "dedup": {"near": False}}
    config = config_for(sources, val_fraction=0.2, test_fraction=0.1, stratify_by_source=True, **every_document)
    report = build_corpus(config, tmp_path / "out", progress=False)
    by_source = {row["source"]: row for row in report["mix"]}
    splits = {split: [record["source"] for record in iter_documents(tmp_path / "out", split)] for split in ("train", "val", "test")}
    # Stratified: each source is split exactly in proportion.
    for path, total in ((str(heavy), 60), (str(light), 90)):
        assert by_source[path]["documents"] == total
        assert (splits["val"].count(path), splits["test"].count(path)) == (round(total * 0.2), round(total * 0.1))
    # Mixing: weight 2 writes each training document twice; 0.5 keeps about half, chosen by hash. Never in val/test.
    heavy_train, light_train = 60 - 12 - 6, 90 - 18 - 9
    assert splits["train"].count(str(heavy)) == 2 * heavy_train == by_source[str(heavy)]["train_documents_written"]
    light_written = splits["train"].count(str(light))
    assert 0.3 * light_train < light_written < 0.7 * light_train
    assert report["train_documents"] == heavy_train + light_written  # distinct documents; the mix repeats some
    # The ones the mix leaves out are logged like every other drop.
    assert report["rejected"]["mix_subsampled"] == light_train - light_written
    assert sum(record["reason"] == "mix_subsampled" for record in iter_rejected(tmp_path / "out")) == light_train - light_written
    assert abs(sum(row["train_share"] for row in report["mix"]) - 1) < 1e-3
    # Unstratified, the split follows the hash alone: about the same fractions overall.
    report = build_corpus(config_for(sources, val_fraction=0.2, test_fraction=0.1, **every_document), tmp_path / "plain", progress=False)
    assert 15 <= report["val_documents"] <= 45 and 5 <= report["test_documents"] <= 30


def test_decontamination_drops_documents_sharing_13_grams(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", PARAGRAPHS[:20])
    words = PARAGRAPHS[5].split()
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": "Q?", "text": " ".join(words[10:24]).upper()}) + "\n",
                                         encoding="utf-8")
    config = config_for([train], decontamination={"enabled": True, "eval_files": [str(tmp_path / "eval.jsonl")]})
    report = build_corpus(config, tmp_path / "out", progress=False)
    assert report["rejected"]["contaminated"] == 1
    assert report["kept"] == 20 - sum(report["rejected"].values())
    (record,) = [record for record in iter_rejected(tmp_path / "out") if record["reason"] == "contaminated"]
    assert record["id"] == "train.jsonl:6#0" and record["contamination"].split()[0] in PARAGRAPHS[5].lower()
    with pytest.raises(Exception, match="decontamination evaluation file not found"):
        build_corpus(config_for([train], decontamination={"enabled": True, "eval_files": [str(tmp_path / "nope.txt")]}),
                     tmp_path / "again", progress=False)


def test_broken_inputs_are_reported_and_the_rest_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    good = [json.dumps({"text": text}).encode() for text in PARAGRAPHS[:6]]
    lines = [good[0], b'{"text": "bad byte \xff in the middle"}', good[1], b"{not json", good[2], b'{"title": "no text"}',
             b'["a", "list"]', good[3], b'{"text": "' + b"x" * 5000 + b'"}', good[4]]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "disguised.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    (folder / "one-line.txt").write_text((" ".join(PARAGRAPHS[6:9]) + " ") * 2000, encoding="utf-8")  # ~3 MB, no newline
    (folder / "loop").symlink_to(folder)
    os.symlink("itself.txt", folder / "itself.txt")  # a file link that leads back to itself
    write_jsonl(folder / "fine.jsonl", PARAGRAPHS[9:12])
    config = config_for([folder], max_line_bytes=4096, dedup={"near": False})
    report = build_corpus(config, tmp_path / "out", progress=False)

    rejected = {record["id"]: record for record in iter_rejected(tmp_path / "out")}
    assert rejected["broken/mixed.jsonl:2"]["reason"] == "invalid_utf8"
    assert rejected["broken/mixed.jsonl:4"]["reason"] == "invalid_json"
    assert rejected["broken/mixed.jsonl:4"]["detail"].startswith(str(folder / "mixed.jsonl") + ":4")
    assert rejected["broken/mixed.jsonl:6"]["reason"] == "missing_text_field"
    assert rejected["broken/mixed.jsonl:7"]["reason"] == "not_an_object"
    assert rejected["broken/mixed.jsonl:9"]["reason"] == "line_too_long"
    kept_ids = {record["id"] for record in kept_records(tmp_path / "out")}
    # One bad byte or line never costs the rest of the file.
    assert {f"broken/mixed.jsonl:{line}#0" for line in (1, 3, 5, 8, 10)} <= kept_ids
    skipped = {Path(item["path"]).name: item["reason"] for item in report["skipped_files"]}
    assert skipped["empty.txt"] == "empty_file" and skipped["disguised.txt"] == "binary" and skipped["itself.txt"] == "symlink_loop"
    # The 3 MB line was read in blocks and cut into pieces (which the repetition rules then reject, rightly).
    pieces = [record for doc_id, record in rejected.items() if doc_id.startswith("broken/one-line.txt")]
    assert len(pieces) > 100 and all(len(record["text"]) <= 20_000 for record in pieces)
    assert {record["reason"] for record in pieces} <= {"duplicate"} | {reason for reason in report["rejected"] if reason.startswith("quality_")}
    assert report["documents_after_cutting"] == report["kept"] + report["rejected_total"]
    for step in report["steps"]:
        if step["step"] != "cut":
            assert step["documents_in"] == step["documents_out"] + sum(step["rejected"].values()), step
    assert {"broken/fine.jsonl:1#0", "broken/fine.jsonl:3#0"} <= kept_ids  # read once, although the loop leads back


def test_a_permission_denied_file_is_skipped(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    write_jsonl(tmp_path / "src" / "ok.jsonl", PARAGRAPHS[:3])
    locked = write_jsonl(tmp_path / "src" / "locked.jsonl", PARAGRAPHS[3:6])
    locked.chmod(0)
    report = build_corpus(config_for([tmp_path / "src"]), tmp_path / "out", progress=False)
    assert report["files_skipped_by_reason"] == {"unreadable": 1} and report["kept"] == 3
