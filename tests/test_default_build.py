"""The full default build, as a new user runs it (slow: about ten minutes; `python -m pytest -m slow`)."""

import json
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
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
    for artifact in ("recipe", "documents", "tokenizer", "token shards", "checkpoints", "evaluation report"):
        assert artifact in result.stdout
