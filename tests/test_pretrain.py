"""Pretraining through the real CLI on the tiny recipe: budgets, exact resume after kill -9, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.training.checkpoint import list_checkpoints, resolve_checkpoint, verify_checkpoint

RESUME_ARGS = ["--train.max_steps", "60", "--train.checkpoint_interval", "10", "--train.log_interval", "1",
               "--train.eval_interval", "20", "--train.threads", "1", "--train.precision", "fp32", "--quiet"]


def lmforge(*args, workdir: Path, check=True, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmforge.cli", *args, "--workdir", str(workdir)]
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=300)


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_killed_pretrain_resumes_to_the_same_curve_and_weights(prepared_workdir, tmp_path):
    import shutil

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(prepared_workdir, straight)
    shutil.copytree(prepared_workdir, killed)
    lmforge("pretrain", "tiny", *RESUME_ARGS, workdir=straight)

    command = [sys.executable, "-m", "lmforge.cli", "pretrain", "tiny", *RESUME_ARGS, "--workdir", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and max(train_losses(killed / "tiny") or {0: 0}) >= 25:
            break
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed; raise max_steps"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = max(train_losses(killed / "tiny"))
    assert 25 <= interrupted_at < 60

    resumed = lmforge("pretrain", "tiny", *RESUME_ARGS, workdir=killed)
    assert "resuming from" in resumed.stderr
    expected, got = train_losses(straight / "tiny"), train_losses(killed / "tiny")
    assert sorted(got) == list(range(1, 61))  # one record per step: re-run steps replaced, none missing
    assert got == expected  # bit-identical losses at every step
    final = lambda run: load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    straight_weights, resumed_weights = final(straight / "tiny"), final(killed / "tiny")
    assert all((straight_weights[name] == resumed_weights[name]).all() for name in straight_weights)


def test_finished_pretrain_is_skipped_and_extended_when_the_budget_grows(prepared_run):
    lmforge("pretrain", "tiny", "--train.max_steps", "12", "--quiet", workdir=prepared_run)
    again = lmforge("pretrain", "tiny", "--train.max_steps", "12", "--quiet", workdir=prepared_run)
    assert "up to date" in again.stdout
    longer = lmforge("pretrain", "tiny", "--train.max_steps", "16", "--quiet", workdir=prepared_run)
    assert "resuming from" in longer.stderr and "16 steps" in longer.stdout


def test_token_budget_bounds_training(prepared_run):
    # 8 sequences x 64 tokens = 512 tokens per step: a 2,000-token budget ends after 4 steps.
    result = lmforge("pretrain", "tiny", "--train.max_steps", "null", "--train.max_tokens", "2000", "--quiet", workdir=prepared_run)
    assert "4 steps, 2,048 tokens" in result.stdout


def test_time_budget_bounds_training(prepared_run):
    started = time.time()
    result = lmforge("pretrain", "tiny", "--train.max_steps", "null", "--train.max_minutes", "0.05", "--quiet", workdir=prepared_run)
    assert "pretrain:" in result.stdout and time.time() - started < 60
    manifest = json.loads((prepared_run / "tiny" / "checkpoints" / "manifest.json").read_text())
    assert 3.0 <= manifest["stats"]["elapsed_seconds"] < 6.0


def test_checkpoints_are_pruned_and_committed(prepared_run):
    lmforge("pretrain", "tiny", "--train.max_steps", "25", "--train.checkpoint_interval", "5", "--train.keep_checkpoints", "2",
            "--quiet", workdir=prepared_run)
    root = prepared_run / "tiny" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000020", "step_00000025"]
    assert not list(root.glob(".step_*"))
    manifest = verify_checkpoint(root / "step_00000025")
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json", "tokenizer/tokenizer.json"} <= set(manifest["files"])


def test_corrupted_checkpoint_is_named_and_resume_falls_back(prepared_run):
    lmforge("pretrain", "tiny", "--train.max_steps", "20", "--train.checkpoint_interval", "10", "--quiet", workdir=prepared_run)
    root = prepared_run / "tiny" / "checkpoints"
    weights = root / "step_00000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="step_00000020/model.safetensors"):
        verify_checkpoint(root / "step_00000020")
    generated = lmforge("generate", str(prepared_run / "tiny"), "--max-new-tokens", "3", workdir=prepared_run, check=False)
    assert generated.returncode == 2 and "corrupted" in generated.stderr and "Traceback" not in generated.stderr
    resumed = lmforge("pretrain", "tiny", "--train.max_steps", "25", "--quiet", workdir=prepared_run)
    assert "skipping" in resumed.stderr and "resuming from" in resumed.stderr and "step_00000010" in resumed.stderr


def test_incomplete_checkpoint_is_not_trusted(prepared_run):
    lmforge("pretrain", "tiny", "--train.max_steps", "10", "--quiet", workdir=prepared_run)
    checkpoint = prepared_run / "tiny" / "checkpoints" / "step_00000010"
    (checkpoint / "manifest.json").unlink()
    result = lmforge("generate", str(checkpoint), workdir=prepared_run, check=False)
    assert result.returncode == 2 and "no valid checkpoint" in result.stderr or "incomplete" in result.stderr


def test_checkpoint_from_a_different_model_config_is_refused(prepared_run):
    lmforge("pretrain", "tiny", "--train.max_steps", "5", "--quiet", workdir=prepared_run)
    result = lmforge("pretrain", "tiny", "--train.max_steps", "8", "--model.n_layers", "3", "--quiet", workdir=prepared_run, check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "different model config" in errors[0] and "n_layers: checkpoint 2 vs recipe 3" in errors[0]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(prepared_run):
    command = [sys.executable, "-m", "lmforge.cli", "pretrain", "tiny", "--train.max_steps", "100000", "--train.log_interval", "1",
               "--quiet", "--workdir", str(prepared_run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = prepared_run / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted: saved" in stderr
    assert list_checkpoints(prepared_run / "tiny" / "checkpoints")
