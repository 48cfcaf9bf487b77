"""The full default build, as a new user runs it (slow: about ten minutes; `python -m pytest -m slow`)."""

import json
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_default_build_finishes_in_ten_minutes_and_beats_unigram(tmp_path):
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", "--workdir", str(tmp_path), "--quiet"],
                            capture_output=True, text=True, timeout=900)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert elapsed < 600, f"default build took {elapsed:.0f} s"
    report = json.loads((tmp_path / "default" / "eval" / "report.json").read_text())
    assert report["val_bits_per_byte"] < 0.75 * report["unigram_val_bits_per_byte"]
    assert all(sample["completion"].strip() for sample in report["samples"])
    low, high = report["held_out"]["interval"]["bits_per_byte"]
    assert low < report["val_bits_per_byte"] < high and report["held_out"]["bits_per_char"] > 0
    cloze = report["tasks"]["stdlib-cloze"]["metrics"]
    assert cloze["acc"] - 2 * cloze["acc_stderr"] > cloze["chance"]  # the built-in task is learnt, not guessed
    markdown = (tmp_path / "default" / "eval" / "report.md").read_text()
    assert "stdlib-cloze" in markdown and "## Samples" in markdown and "95% interval" in markdown
    for artifact in ("recipe", "documents", "tokenizer", "token shards", "checkpoints", "evaluation report"):
        assert artifact in result.stdout
    # The last stage fine-tunes an assistant: held-out documentation questions are answered measurably better.
    sft = json.loads((tmp_path / "default" / "sft" / "report.json").read_text())
    assert sft["after"]["val_loss"] < sft["before"]["val_loss"] - 1.0 and sft["after"]["rougeL"] > sft["before"]["rougeL"] + 5
    # The data stage ran every step of the recipe, and its report shows what each removed.
    data = json.loads((tmp_path / "default" / "data" / "report.json").read_text())
    steps = {step["step"]: step for step in data["steps"]}
    assert steps["language"]["rejected"] and steps["quality"]["rejected"] and steps["pii"]["changed"]["documents_scrubbed"] > 0
    assert all(step["documents_in"] == step["documents_out"] + sum(step["rejected"].values()) for step in data["steps"] if step["step"] != "cut")
    # The filters take signature-only modules and non-English pages: about 5% of the text, a quarter of the pieces.
    assert 0.9 < steps["pii"]["bytes_out"] / steps["cut"]["bytes_out"] < 1.0 and data["train_chars"] > 1_800_000
