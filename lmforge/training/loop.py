"""The training loop, shared by every objective: pretraining, chat fine-tuning (SFT), and what comes next.

An ``Objective`` says what is trained and on what: it builds the model (loaded, wrapped or frozen as it
needs), gives the batches (inputs and targets, -100 where no loss is taken), scores validation and
writes and reads its checkpoints. ``TrainingLoop`` owns everything else, the same for all of them:
the optimizer and schedule, gradient accumulation and clipping, the non-finite and spike guards,
metrics and TensorBoard, periodic validation, the best checkpoint and early stopping, checkpoints by
step and by time, Ctrl-C/SIGTERM, exact resume, DDP/FSDP2 under torchrun, and the manifest written last.

Resuming is exact: the checkpoint restores weights, optimizer moments, the step (hence the schedule),
the torch RNG and the number of samples consumed (hence the data order, see ``batches``), so the
loss curve after a resume is the one an uninterrupted run draws.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from lmforge.artifacts import is_up_to_date, read_manifest, write_manifest
from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder
from lmforge.training.checkpoint import latest_valid_checkpoint, mark_best
from lmforge.training.device import autocast, resolve_device, resolve_precision
from lmforge.training.distributed import Ranks, gradient_norm, no_sync, resolve_strategy, wrap_model
from lmforge.training.flops import peak_flops
from lmforge.training.metrics import MetricsLog, plot_loss_curve
from lmforge.training.optim import build_optimizer, learning_rate, set_learning_rate


class Batches(Protocol):
    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, T) int64: samples first_sample .. first_sample + batch_size - 1."""

    def window_ids(self, first_sample: int, count: int) -> list[int]:
        """Which stored sequences those samples are (for audits with ``train.log_sample_ids``)."""


class Objective(Protocol):
    """What one kind of training plugs into ``TrainingLoop``; see ``PretrainObjective`` and ``SftObjective``."""

    stage: str  # the manifest's stage name, e.g. "pretrain"
    section: dict  # settings fingerprinted into the manifest: a change means "train again"
    inputs: dict[str, str]  # input fingerprints: likewise
    checkpoints: Path  # where step_N/ folders, best.json and the manifest go
    logs: Path  # metrics.jsonl, tensorboard/ and loss_curve.png
    settings: str  # the recipe section holding the learning rate etc., named in error messages
    resume_key: str  # trainer-state field that must equal resume_value for a checkpoint to be resumed
    resume_value: str
    resume_mismatch: str  # what a checkpoint with another resume_value was trained on, e.g. "different token shards"
    title: str  # of the loss-curve plot

    def build_model(self, device: torch.device) -> Decoder:
        """The model to train, on ``device``, with ``requires_grad`` off for what must not change."""

    def batches(self, model: Decoder) -> Batches: ...

    def validate(self, model: Decoder, batch_size: int, dtype: torch.dtype | None) -> float:
        """Mean validation loss in nats per scored token."""

    def save(self, step: int, model: Decoder, optimizer: torch.optim.Optimizer, state: dict, ranks: Ranks) -> Path:
        """Write and commit checkpoint ``step`` (collective under torchrun); return its folder."""

    def resume(self, folder: Path | None, model: Decoder, optimizer: torch.optim.Optimizer, ranks: Ranks) -> dict:
        """Restore ``folder`` into model and optimizer (collective); return the trainer state saved with it."""


@dataclass
class TrainResult:
    checkpoint: Path
    step: int
    tokens_seen: int
    final_loss: float | None
    val_loss: float | None
    interrupted: bool = False
    skipped: bool = False


def budget_progress(config: TrainConfig, state: dict) -> float:
    """Fraction (0..1+) of the training budget spent: the largest over the bounds that are set."""
    fractions = []
    if config.max_steps:
        fractions.append(state["step"] / config.max_steps)
    if config.max_tokens:
        fractions.append(state["tokens_seen"] / config.max_tokens)
    if config.max_minutes:
        fractions.append(state["elapsed_seconds"] / (60 * config.max_minutes))
    return max(fractions)


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and return instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TrainingLoop:
    """Train ``objective`` under ``config`` (a ``TrainConfig``: budget, batch, optimizer, guards, cadence).

    ``on_eval(step, val_loss)`` is called after every validation; an exception it raises stops training
    and propagates. Under ``torchrun`` every rank runs the loop and rank 0 alone writes files.
    """

    def __init__(self, objective: Objective, config: TrainConfig, ranks: Ranks, device_name: str, progress: bool = True, on_eval=None):
        self.objective, self.config, self.ranks, self.on_eval = objective, config, ranks, on_eval
        self.progress = progress and ranks.is_main
        self.device_name = device_name

    def run(self, fresh: bool) -> TrainResult:
        objective, ranks, config = self.objective, self.ranks, self.config
        finished = None
        if ranks.is_main:
            if fresh:
                shutil.rmtree(objective.checkpoints, ignore_errors=True)
                (objective.logs / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(objective.logs / "tensorboard", ignore_errors=True)
            elif is_up_to_date(objective.checkpoints, objective.stage, objective.section, objective.inputs):
                finished = read_manifest(objective.checkpoints, objective.stage)["stats"]
            else:
                (objective.checkpoints / "manifest.json").unlink(missing_ok=True)  # training again: the old "done" no longer holds
        finished = ranks.broadcast(finished)
        if finished is not None:
            return TrainResult(objective.checkpoints / finished["checkpoint"], finished["step"], finished["tokens_seen"],
                               finished.get("final_loss"), finished.get("val_loss"), skipped=True)

        self.device = device = resolve_device(self.device_name)
        self.dtype = resolve_precision(config.precision, device)
        self.strategy = resolve_strategy(config.distributed, ranks)
        if self.strategy == "fsdp" and config.optimizer == "muon":
            raise LmforgeError("train.optimizer muon needs whole matrices; use train.distributed ddp with it (fsdp shards them)")
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model = model = objective.build_model(device)
        model.activation_checkpointing = config.activation_checkpointing
        model.loss_chunk_tokens = config.loss_chunk_tokens
        self.trained = wrap_model(model, self.strategy, device)
        self.optimizer = build_optimizer(model, config, device)
        self.batches = objective.batches(model)
        self.metrics = MetricsLog(objective.logs / "metrics.jsonl") if ranks.is_main else None
        self.state = {"step": 0, "samples_seen": 0, "tokens_seen": 0, "elapsed_seconds": 0.0, "val_loss": None,
                      objective.resume_key: objective.resume_value, "skipped_steps": 0, "spikes": 0,
                      "best_val_loss": None, "best_step": None, "evals_since_best": 0}
        self._resume()
        self.step_fn = _try_compile(self.trained, device) if config.compile else self.trained
        self.flops_per_token = model.flops_per_token()
        self.peak = peak_flops(device, self.dtype) if ranks.is_main else None
        try:
            return self._train()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    def _resume(self) -> None:
        objective = self.objective
        found = latest_valid_checkpoint(objective.checkpoints) if self.ranks.is_main else None
        found = self.ranks.broadcast(str(found) if found else None)
        if found is None:
            return
        state = objective.resume(Path(found), self.model, self.optimizer, self.ranks)
        if state.get(objective.resume_key) != objective.resume_value:
            raise LmforgeError(f"checkpoint {found} was trained on {objective.resume_mismatch}; use a new run name or --fresh")
        self.state.update(state)
        if self.metrics is not None:
            self.metrics.truncate_after(state["step"])
            print(f"resuming from {found} (step {state['step']})", file=sys.stderr)

    def _save(self) -> Path:
        path = self.objective.save(self.state["step"], self.model, self.optimizer, self.state, self.ranks)
        self.last_saved_step = self.state["step"]
        return path

    def _validate(self) -> float:
        return self.objective.validate(self.model, self.config.batch_size, self.dtype)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous: the GPU does not wait on the host.
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _after_validation(self) -> bool:
        """Record the validation loss, keep the best checkpoint; True when early stopping says stop."""
        state, config = self.state, self.config
        val = state["val_loss"]
        self._log({"step": state["step"], "val_loss": val, "tokens_seen": state["tokens_seen"]})
        if self.on_eval is not None:
            self.on_eval(state["step"], val)
        improved = state["best_val_loss"] is None or val < state["best_val_loss"] - config.early_stopping_min_delta
        if improved:
            state["best_val_loss"], state["best_step"], state["evals_since_best"] = val, state["step"], 0
            if config.keep_best_checkpoint:
                path = self._save()
                if self.ranks.is_main:
                    mark_best(self.objective.checkpoints, path, val)
        else:
            state["evals_since_best"] += 1
        if self.metrics is not None:
            plot_loss_curve(self.metrics.records(), self.objective.logs / "loss_curve.png", title=self.objective.title)
        patience = config.early_stopping_patience
        if patience and state["evals_since_best"] >= patience:
            self._log({"step": state["step"], "event": "early_stop", "best_step": state["best_step"], "best_val_loss": state["best_val_loss"]})
            return True
        return False

    def _train(self) -> TrainResult:
        config, state, ranks, objective = self.config, self.state, self.ranks, self.objective
        context = self.model.config.context_length
        rows = ranks.shard(config.batch_size)
        tokens_per_step = config.batch_size * config.grad_accum_steps * context
        recent_losses, recent_norms = deque(maxlen=config.spike_window), deque(maxlen=config.spike_window)
        bar = tqdm(total=100, disable=not self.progress, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", file=sys.stderr)
        bar.update(min(100, round(100 * budget_progress(config, state))))
        self.last_saved_step = None
        last_checkpoint_time = time.monotonic()
        last_loss, bad_streak, interrupted, stopped_early = None, 0, False, False
        local_seconds = state["elapsed_seconds"]
        self.trained.train()
        with _StopRequest() as stop:
            while budget_progress(config, state) < 1.0:
                started = time.perf_counter()
                lr = learning_rate(config, state["step"], budget_progress(config, state))
                set_learning_rate(self.optimizer, lr)
                local_loss = torch.zeros((), device=self.device)
                sample_ids = []
                for micro in range(config.grad_accum_steps):
                    inputs, targets = self.batches.batch(state["samples_seen"], config.batch_size)
                    if config.log_sample_ids:
                        sample_ids += self.batches.window_ids(state["samples_seen"], config.batch_size)
                    state["samples_seen"] += config.batch_size
                    with no_sync(self.trained, micro < config.grad_accum_steps - 1):
                        with autocast(self.device, self.dtype):
                            loss = self.step_fn(self._to_device(inputs[rows]), targets=self._to_device(targets[rows])) / config.grad_accum_steps
                        loss.backward()
                    local_loss += loss.detach()
                grad_norm = float(gradient_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip or math.inf)))
                local_seconds += time.perf_counter() - started
                # One collective agrees the numbers every rank's decisions depend on. Clocks differ
                # between ranks, so only rank 0 votes on a checkpoint being due by time.
                time_due_here = ranks.is_main and bool(config.checkpoint_minutes) and \
                    time.monotonic() - last_checkpoint_time >= 60 * config.checkpoint_minutes
                loss_sum, stop_votes, seconds_sum, time_votes = ranks.sum(
                    [float(local_loss), float(stop.requested), local_seconds, float(time_due_here)])
                step_loss, stop_requested = loss_sum / ranks.world_size, stop_votes > 0

                finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                spike = finite and (_is_spike(step_loss, recent_losses, config.spike_sigma) or _is_spike(grad_norm, recent_norms, config.spike_sigma))
                if not finite:
                    # Checked before optimizer.step(): a non-finite step never touches the weights.
                    state["skipped_steps"] += 1
                    bad_streak += 1
                    self._log({"step": state["step"] + 1, "event": "skipped_nonfinite", "loss": _json_number(step_loss), "grad_norm": _json_number(grad_norm)})
                    if bad_streak >= config.max_bad_steps:
                        last = latest_valid_checkpoint(objective.checkpoints, warn=False) if ranks.is_main else None
                        where = f"; the last good checkpoint {last} is intact" if last else ""
                        raise LmforgeError(f"loss or gradient was not finite for {bad_streak} steps in a row at step {state['step'] + 1}; "
                                           f"lower {objective.settings}.learning_rate or check the data{where}")
                else:
                    bad_streak = 0
                    if spike:
                        state["spikes"] += 1
                        self._log({"step": state["step"] + 1, "event": "spike", "loss": step_loss, "grad_norm": grad_norm,
                                   "skipped": config.skip_spikes})
                    if not (spike and config.skip_spikes):
                        started_update = time.perf_counter()
                        self.optimizer.step()
                        local_seconds += time.perf_counter() - started_update
                    else:
                        state["skipped_steps"] += 1
                    recent_losses.append(step_loss)
                    recent_norms.append(grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                elapsed = max(seconds_sum / ranks.world_size - state["elapsed_seconds"], 1e-9)
                state["step"] += 1
                state["tokens_seen"] += tokens_per_step
                state["elapsed_seconds"] = seconds_sum / ranks.world_size
                last_loss = step_loss

                if state["step"] % config.log_interval == 0 or state["step"] == 1 or config.log_sample_ids:
                    tokens_per_second = tokens_per_step / elapsed
                    record = {"step": state["step"], "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state["tokens_seen"],
                              "tokens_per_second": tokens_per_second, "elapsed_seconds": round(state["elapsed_seconds"], 3)}
                    if self.peak:
                        record["mfu"] = tokens_per_second * self.flops_per_token / ranks.world_size / self.peak
                    if config.log_sample_ids:
                        record["sample_ids"] = sample_ids
                    self._log(record)
                if state["step"] % config.eval_interval == 0:
                    state["val_loss"] = self._validate()
                    stopped_early = self._after_validation()
                bar.set_postfix_str(f"step {state['step']} loss {step_loss:.3f} lr {lr:.2e} {tokens_per_step / elapsed:,.0f} tok/s")
                bar.update(min(100, round(100 * budget_progress(config, state))) - bar.n)

                due = stop_requested or state["step"] % config.checkpoint_interval == 0 or time_votes > 0
                if due and self.last_saved_step != state["step"]:
                    self._save()
                    last_checkpoint_time = time.monotonic()
                if stop_requested:
                    interrupted = True
                    break
                if stopped_early:
                    break
        bar.close()

        if interrupted:
            checkpoint = objective.checkpoints / f"step_{state['step']:08d}"
            if ranks.is_main:
                print(f"interrupted: saved {checkpoint}; run the same command again to resume", file=sys.stderr)
            return TrainResult(checkpoint, state["step"], state["tokens_seen"], last_loss, state["val_loss"], interrupted=True)

        if state["step"] % config.eval_interval != 0 or state["val_loss"] is None:
            state["val_loss"] = self._validate()
            self._after_validation()
        checkpoint = objective.checkpoints / f"step_{state['step']:08d}"
        if self.last_saved_step != state["step"]:
            checkpoint = self._save()  # always: the final state carries the final validation loss
        if ranks.is_main:
            plot_loss_curve(self.metrics.records(), objective.logs / "loss_curve.png", title=objective.title)
            stats = {"checkpoint": checkpoint.name, "step": state["step"], "tokens_seen": state["tokens_seen"], "final_loss": last_loss,
                     "val_loss": state["val_loss"], "best_step": state["best_step"], "best_val_loss": state["best_val_loss"],
                     "early_stopped": stopped_early, "parameters": self.model.num_parameters(),
                     "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                     "elapsed_seconds": state["elapsed_seconds"], "skipped_steps": state["skipped_steps"], "spikes": state["spikes"],
                     "device": str(self.device), "precision": str(self.dtype or "fp32"), "ranks": ranks.world_size, "strategy": self.strategy}
            write_manifest(objective.checkpoints, objective.stage, objective.section, objective.inputs, stats)
        ranks.barrier()
        return TrainResult(checkpoint, state["step"], state["tokens_seen"], last_loss, state["val_loss"])


def _is_spike(value: float, history: deque, sigma: float) -> bool:
    """Far above the recent mean (needs some history: early training falls fast and is noisy)."""
    if len(history) < 16:
        return False
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    return value > mean + sigma * max(std, 1e-6 * abs(mean))


def _json_number(value: float):
    return value if math.isfinite(value) else str(value)  # JSON has no NaN or Inf


# On CPU, letting inductor benchmark its kernel choices measured faster than the default mode
# (BENCHMARKS.md); CUDA graphs are left out because training steps allocate.
CPU_COMPILE_MODE = "max-autotune-no-cudagraphs"


def _try_compile(model: torch.nn.Module, device: torch.device):
    """torch.compile the training module when the platform supports it; otherwise fall back to eager with a note."""
    try:
        compiled = torch.compile(model, mode=CPU_COMPILE_MODE if device.type == "cpu" else None)
    except Exception as exc:  # compile support varies by platform and toolchain
        print(f"warning: torch.compile unavailable ({exc.__class__.__name__}); training in eager mode", file=sys.stderr)
        return model

    def step(inputs, targets):
        nonlocal compiled
        try:
            return compiled(inputs, targets=targets)
        except Exception as exc:
            print(f"warning: torch.compile failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); training in eager mode",
                  file=sys.stderr)
            compiled = model
            return compiled(inputs, targets=targets)

    return step
