"""Pretraining through the real CLI on the tiny recipe: budgets, exact resume after kill -9, checkpoints."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.tokenizer.shards import read_token_meta
from lmforge.training.checkpoint import list_checkpoints, resolve_checkpoint, verify_checkpoint

# Batch 64: the tiny split has 2,914 windows, so the first epoch ends during step 46 of 60.
RESUME_ARGS = ["--train.max_steps", "60", "--train.batch_size", "64", "--train.checkpoint_interval", "10", "--train.log_interval", "1",
               "--train.eval_interval", "20", "--train.threads", "1", "--train.precision", "fp32", "--train.log_sample_ids", "true",
               "--quiet"]
EPOCH_END_STEP = 46


def lmforge(*args, workdir: Path, check=True, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmforge.cli", *args, "--workdir", str(workdir)]
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=300)


def metric_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_records(run) if "loss" in r and "event" not in r}


def sample_ids(run: Path) -> dict[int, list[int]]:
    return {r["step"]: r["sample_ids"] for r in metric_records(run) if "sample_ids" in r}


@pytest.fixture(scope="module")
def uninterrupted(prepared_workdir, tmp_path_factory) -> Path:
    import shutil

    workdir = tmp_path_factory.mktemp("straight")
    shutil.copytree(prepared_workdir, workdir, dirs_exist_ok=True)
    lmforge("pretrain", "tiny", *RESUME_ARGS, workdir=workdir)
    return workdir / "tiny"


def _kill_when(workdir: Path, condition, extra=()) -> int:
    """Start training, SIGKILL it as soon as ``condition(run)`` holds; returns the last logged step."""
    command = [sys.executable, "-m", "lmforge.cli", "pretrain", "tiny", *RESUME_ARGS, *extra, "--workdir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = workdir / "tiny"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if (run / "logs" / "metrics.jsonl").exists() and condition(run):
                break
        except (ValueError, FileNotFoundError):  # a line or folder caught half-written
            pass
        time.sleep(0.002)
    assert process.poll() is None, "training finished before it could be killed; raise max_steps"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return max(train_losses(run))


def _last_step_at_least(step):
    return lambda run: max(train_losses(run) or {0: 0}) >= step


def _writing_a_checkpoint(run):
    return any((run / "checkpoints").glob(".step_*.tmp-*"))


# Kill points: two random steps (seeded), one inside a checkpoint write (checkpoints every step make
# that likely; the test checks it happened), and one after the epoch boundary with the last
# checkpoint before it, so the resumed run crosses the boundary itself.
KILLS = {
    "random_seed_1": (_last_step_at_least(random.Random(1).randint(12, 58)), ()),
    "random_seed_2": (_last_step_at_least(random.Random(2).randint(12, 58)), ()),
    "during_checkpoint_write": (lambda run: max(train_losses(run) or {0: 0}) >= 15 and _writing_a_checkpoint(run),
                                ("--train.checkpoint_interval", "1")),
    "across_epoch_boundary": (_last_step_at_least(EPOCH_END_STEP + 2), ("--train.checkpoint_interval", "20")),
}


@pytest.mark.parametrize("scenario", list(KILLS))
def test_killed_pretrain_resumes_to_the_same_curve_weights_and_samples(uninterrupted, prepared_workdir, tmp_path, scenario):
    import shutil

    condition, extra = KILLS[scenario]
    killed = tmp_path / "killed"
    shutil.copytree(prepared_workdir, killed)
    interrupted_at = _kill_when(killed, condition, extra)
    assert interrupted_at < 60
    if scenario == "during_checkpoint_write":
        assert _writing_a_checkpoint(killed / "tiny"), "the kill landed outside a checkpoint write"
    if scenario == "across_epoch_boundary":
        assert max(int(p.name[5:]) for p in list_checkpoints(killed / "tiny" / "checkpoints")) < EPOCH_END_STEP < interrupted_at

    resumed = lmforge("pretrain", "tiny", *RESUME_ARGS, *extra, workdir=killed)
    assert "resuming from" in resumed.stderr
    assert not list((killed / "tiny" / "checkpoints").glob(".step_*"))  # the half-written folder was cleaned up
    expected, got = train_losses(uninterrupted), train_losses(killed / "tiny")
    assert sorted(got) == list(range(1, 61))  # one record per step: re-run steps replaced, none missing
    assert got == expected  # bit-identical losses at every step
    final = lambda run: load_file(str(resolve_checkpoint(run) / "model.safetensors"))
    straight_weights, resumed_weights = final(uninterrupted), final(killed / "tiny")
    assert all((straight_weights[name] == resumed_weights[name]).all() for name in straight_weights)

    # The samples consumed, in order: identical to the uninterrupted run, and each epoch a permutation.
    consumed = [window for step in range(1, 61) for window in sample_ids(killed / "tiny")[step]]
    assert consumed == [window for step in range(1, 61) for window in sample_ids(uninterrupted)[step]]
    windows = (read_token_meta(killed / "tiny" / "tokens")["splits"]["train"]["tokens"] - 1) // 64
    assert len(consumed) > windows  # the run did cross an epoch boundary
    first_epoch = consumed[:windows]
    assert sorted(first_epoch) == list(range(windows))  # no duplicates, no skips
    assert len(set(consumed[windows:])) == len(consumed) - windows  # the second epoch has no duplicates either


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


def _train_in_process(workdir: Path, **overrides):
    from lmforge import pipeline
    from lmforge.config import load_recipe
    from lmforge.training.pretrain import pretrain

    recipe = load_recipe("tiny", {f"train.{k}": v for k, v in {"threads": 1, **overrides}.items()})
    return pretrain(recipe, pipeline.layout_for(recipe, workdir), progress=False)


def test_running_out_of_disk_during_a_save_keeps_the_previous_checkpoint(prepared_run, monkeypatch):
    import errno

    from lmforge.training import checkpoint

    real_save_file, calls = checkpoint.save_file, []

    def disk_fills_at_step_20(tensors, path, *args, **kwargs):
        calls.append(path)
        if ".step_00000020" in path and path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_at_step_20)
    with pytest.raises(LmforgeError, match="could not save checkpoint step_00000020: No space left on device; "
                                           "the previous checkpoint step_00000010 is intact"):
        _train_in_process(prepared_run, max_steps=30, checkpoint_interval=10, keep_best_checkpoint=False)
    root = prepared_run / "tiny" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000010"]
    assert not list(root.glob(".step_*"))  # the partial folder is gone
    verify_checkpoint(root / "step_00000010")
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    result = _train_in_process(prepared_run, max_steps=30, checkpoint_interval=10, keep_best_checkpoint=False)
    assert result.step == 30


def test_non_finite_steps_are_skipped_then_training_stops_with_the_last_checkpoint_intact(prepared_run):
    import torch

    # A learning rate of 1e4 blows the weights up within a few steps; the loss then overflows.
    with pytest.raises(LmforgeError, match=r"not finite for 3 steps in a row .* the last good checkpoint .*step_\d+ is intact"):
        _train_in_process(prepared_run, max_steps=200, learning_rate=1e4, warmup_steps=0, checkpoint_interval=2, max_bad_steps=3,
                          keep_best_checkpoint=False, log_interval=1)
    run = prepared_run / "tiny"
    events = [r for r in metric_records(run) if r.get("event") == "skipped_nonfinite"]
    assert len(events) == 3 and [e["step"] for e in events] == list(range(events[0]["step"], events[0]["step"] + 3))
    for folder in list_checkpoints(run / "checkpoints"):
        verify_checkpoint(folder)
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(str(folder / name)).values()), (folder, name)


def test_a_checkpoint_with_a_non_finite_tensor_is_refused(tmp_path, prepared_workdir):
    import torch

    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.training.checkpoint import save_checkpoint

    model = Decoder(DecoderConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, ffn_hidden=32, context_length=8))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LmforgeError, match="up_proj.weight` holds NaN"):
        save_checkpoint(tmp_path, 1, model, None, {}, prepared_workdir / "tiny" / "tokenizer", keep=2)
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".step_*"))


def test_early_stopping_keeps_the_best_checkpoint_beyond_the_last_k(prepared_run):
    # An improvement threshold of 10 nats is never met, so patience 2 stops two evaluations after the first.
    result = _train_in_process(prepared_run, max_steps=200, eval_interval=5, checkpoint_interval=5, keep_checkpoints=1,
                               early_stopping_patience=2, early_stopping_min_delta=10.0)
    assert result.step == 15
    root = prepared_run / "tiny" / "checkpoints"
    manifest = json.loads((root / "manifest.json").read_text())["stats"]
    assert manifest["early_stopped"] and manifest["best_step"] == 5
    assert json.loads((root / "best.json").read_text())["path"] == "step_00000005"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005", "step_00000015"]  # best + the newest 1
    assert any(r.get("event") == "early_stop" for r in metric_records(prepared_run / "tiny"))


def test_spike_guard_logs_and_skips_updates_far_above_the_recent_mean(prepared_run):
    # A threshold of 0.01 sigma makes ordinary noise count as a spike, so the guard's path is exercised on real data.
    _train_in_process(prepared_run, max_steps=60, spike_sigma=0.01, spike_window=16, skip_spikes=True, log_interval=1)
    run = prepared_run / "tiny"
    spikes = [r for r in metric_records(run) if r.get("event") == "spike"]
    assert spikes and all(s["skipped"] for s in spikes) and min(s["step"] for s in spikes) > 16
    stats = json.loads((run / "checkpoints" / "manifest.json").read_text())["stats"]
    assert stats["spikes"] == len(spikes) and stats["skipped_steps"] == len(spikes)
