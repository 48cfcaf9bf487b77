"""`lmforge pretrain` under torchrun on CPU (gloo, 2 processes) trains the same model as one process.

The recipe's batch is global and every rank takes an equal slice, so 2 ranks and 1 rank see the same
samples per step; only the order of floating-point sums differs. Tolerance: 1e-4 nats per step,
about 200x the differences measured (~5e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TOLERANCE = 1e-4
# fp32 everywhere: on a CPU with fast bf16, `auto` autocasts, and bf16 rounding differs between batch shapes.
STEPS = ["--train.precision", "fp32", "--train.max_steps", "20", "--train.log_interval", "1", "--train.eval_interval", "10", "--train.checkpoint_interval", "10"]


def _pretrain(workdir: Path, ranks: int, *extra: str) -> None:
    command = ["-m", "lmforge.cli", "pretrain", "tiny", "--workdir", str(workdir), "--quiet", *STEPS, *extra]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *command]
    else:
        command += ["--train.threads", "1"]  # as each torchrun rank gets
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "event" not in r}


def _val_losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def _final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "tiny" / "checkpoints" / "step_00000020" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_rank(prepared_workdir, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one_rank")
    shutil.copytree(prepared_workdir, workdir, dirs_exist_ok=True)
    _pretrain(workdir, 1)
    return workdir


def _assert_same_training(reference: Path, other: Path, steps=range(1, 21)) -> None:
    expected, got = _losses(reference), _losses(other)
    for step in steps:
        assert abs(expected[step] - got[step]) < TOLERANCE, (step, expected[step], got[step])
    for step, value in _val_losses(reference).items():
        assert abs(value - _val_losses(other)[step]) < TOLERANCE
    reference_weights, other_weights = _final_weights(reference), _final_weights(other)
    assert reference_weights.keys() == other_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.allclose(tensor, other_weights[name], atol=1e-4), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(one_rank, prepared_run, strategy):
    _pretrain(prepared_run, 2, "--train.distributed", strategy)
    _assert_same_training(one_rank, prepared_run)
    stats = json.loads((prepared_run / "tiny" / "checkpoints" / "manifest.json").read_text())["stats"]
    assert stats["ranks"] == 2 and stats["strategy"] == strategy


def test_a_checkpoint_saved_by_two_sharded_ranks_resumes_on_one(one_rank, prepared_run):
    _pretrain(prepared_run, 2, "--train.distributed", "fsdp")
    checkpoints = prepared_run / "tiny" / "checkpoints"
    # Roll the run back to its step-10 checkpoint, written by two FSDP ranks, as if it had stopped there.
    shutil.rmtree(checkpoints / "step_00000020")
    for pointer in ("latest.json", "manifest.json", "best.json"):
        (checkpoints / pointer).unlink(missing_ok=True)
    _pretrain(prepared_run, 1)
    _assert_same_training(one_rank, prepared_run, steps=range(11, 21))


def test_batch_not_divisible_by_ranks_is_a_clear_error(prepared_run):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli", "pretrain",
               "tiny", "--workdir", str(prepared_run), "--quiet", "--train.batch_size", "7", "--train.max_steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode != 0
    assert "error: train.batch_size (7) must be divisible by the number of processes (2)" in result.stderr
    assert "lmforge/" not in result.stderr  # no traceback from our code (torchrun's launcher prints its own)
