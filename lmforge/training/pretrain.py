"""The pretraining loop: one function that reads a recipe, trains, validates, checkpoints and resumes.

Resuming is exact: the checkpoint restores weights, optimizer moments, the step (hence the schedule),
the torch RNG and the number of samples consumed (hence the data order, see ``batches``), so the
loss curve after a resume is the one an uninterrupted run draws.
"""

from __future__ import annotations

import math
import signal
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.artifacts import RunLayout, is_up_to_date, read_manifest, write_manifest
from lmforge.config import Recipe, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.evaluation.intrinsic import total_nats
from lmforge.training.batches import TrainBatches
from lmforge.training.checkpoint import latest_valid_checkpoint, load_training_state, save_checkpoint
from lmforge.training.device import autocast, resolve_device, resolve_precision
from lmforge.training.metrics import MetricsLog, plot_loss_curve
from lmforge.training.optim import build_optimizer, learning_rate

MAX_CONSECUTIVE_BAD_STEPS = 5


@dataclass
class PretrainResult:
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


def pretrain(recipe: Recipe, layout: RunLayout, progress: bool = True, fresh: bool = False, on_eval=None) -> PretrainResult:
    """Train ``recipe`` into ``layout.checkpoints``, resuming from the newest valid checkpoint.

    ``on_eval(step, val_loss)`` is called after every validation (e.g. to report to a hyperparameter
    search); an exception it raises stops training and propagates.
    """
    config = recipe.train
    tokens_manifest = read_manifest(layout.tokens, "tokens")
    meta = read_token_meta(layout.tokens)
    model_config = DecoderConfig.from_recipe(recipe.model, meta["vocab_size"])
    section = {"model": recipe.model.model_dump(mode="json"), "train": config.model_dump(mode="json")}
    inputs = {"tokens": tokens_manifest["fingerprint"]}
    if fresh:
        shutil.rmtree(layout.checkpoints, ignore_errors=True)
        (layout.logs / "metrics.jsonl").unlink(missing_ok=True)
    elif is_up_to_date(layout.checkpoints, "pretrain", section, inputs):
        manifest = read_manifest(layout.checkpoints, "pretrain")
        stats = manifest["stats"]
        return PretrainResult(layout.checkpoints / stats["checkpoint"], stats["step"], stats["tokens_seen"],
                              stats.get("final_loss"), stats.get("val_loss"), skipped=True)
    (layout.checkpoints / "manifest.json").unlink(missing_ok=True)  # training again: the old "done" no longer holds

    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = Decoder(model_config).to(device)
    optimizer = build_optimizer(model, config, device)
    train_tokens, val_tokens = load_tokens(layout.tokens, "train"), load_tokens(layout.tokens, "val")
    context = model_config.context_length
    batches = TrainBatches(train_tokens, context, config.seed)
    metrics = MetricsLog(layout.logs / "metrics.jsonl")

    state = {"step": 0, "samples_seen": 0, "tokens_seen": 0, "elapsed_seconds": 0.0, "val_loss": None,
             "tokens_fingerprint": inputs["tokens"], "skipped_steps": 0}
    resume_from = latest_valid_checkpoint(layout.checkpoints)
    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer)
        if state.get("tokens_fingerprint") != inputs["tokens"]:
            raise LmforgeError(f"checkpoint {resume_from} was trained on different token shards; use a new run name or --fresh")
        metrics.truncate_after(state["step"])
        print(f"resuming from {resume_from} (step {state['step']})", file=sys.stderr)

    step_fn = model.loss
    if config.compile:
        step_fn = _try_compile(model)

    def save() -> Path:
        return save_checkpoint(layout.checkpoints, state["step"], model, optimizer, state, layout.tokenizer, config.keep_checkpoints)

    def validate() -> float:
        nats, count = total_nats(model, val_tokens, config.batch_size, meta["bos_id"], dtype, config.eval_batches)
        return nats / max(count, 1)

    tokens_per_step = config.batch_size * config.grad_accum_steps * context
    bar = tqdm(total=100, disable=not progress, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", file=sys.stderr)
    bar.update(min(100, round(100 * budget_progress(config, state))))
    last_checkpoint_time = time.monotonic()
    last_loss, bad_streak = None, 0
    interrupted = False
    model.train()
    with _StopRequest() as stop:
        while budget_progress(config, state) < 1.0:
            started = time.perf_counter()
            lr = learning_rate(config, state["step"], budget_progress(config, state))
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = 0.0
            for _ in range(config.grad_accum_steps):
                inputs_batch, targets_batch = batches.batch(state["samples_seen"], config.batch_size)
                state["samples_seen"] += config.batch_size
                with autocast(device, dtype):
                    loss = step_fn(inputs_batch.to(device), targets_batch.to(device)) / config.grad_accum_steps
                loss.backward()
                step_loss += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            if math.isfinite(step_loss) and torch.isfinite(grad_norm):
                optimizer.step()
                bad_streak = 0
            else:
                # A non-finite step would poison the weights; skipping keeps the last good state.
                state["skipped_steps"] += 1
                bad_streak += 1
                if bad_streak >= MAX_CONSECUTIVE_BAD_STEPS:
                    raise LmforgeError(f"loss or gradient was not finite for {bad_streak} steps in a row at step {state['step']}; "
                                       "lower train.learning_rate (the last checkpoint is intact)")
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            state["step"] += 1
            state["tokens_seen"] += tokens_per_step
            state["elapsed_seconds"] += elapsed
            last_loss = step_loss

            if state["step"] % config.log_interval == 0 or state["step"] == 1:
                metrics.write({"step": state["step"], "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                               "tokens_seen": state["tokens_seen"], "tokens_per_second": tokens_per_step / elapsed,
                               "elapsed_seconds": round(state["elapsed_seconds"], 3)})
            if state["step"] % config.eval_interval == 0:
                state["val_loss"] = validate()
                metrics.write({"step": state["step"], "val_loss": state["val_loss"], "tokens_seen": state["tokens_seen"]})
                if on_eval is not None:
                    on_eval(state["step"], state["val_loss"])
            bar.set_postfix_str(f"step {state['step']} loss {step_loss:.3f} lr {lr:.2e} {tokens_per_step / elapsed:,.0f} tok/s")
            bar.update(min(100, round(100 * budget_progress(config, state))) - bar.n)

            due_by_time = config.checkpoint_minutes and time.monotonic() - last_checkpoint_time >= 60 * config.checkpoint_minutes
            if stop.requested or state["step"] % config.checkpoint_interval == 0 or due_by_time:
                save()
                last_checkpoint_time = time.monotonic()
            if stop.requested:
                interrupted = True
                break
    bar.close()

    if interrupted:
        checkpoint = layout.checkpoints / f"step_{state['step']:08d}"
        print(f"interrupted: saved {checkpoint}; run the same command again to resume", file=sys.stderr)
        return PretrainResult(checkpoint, state["step"], state["tokens_seen"], last_loss, state["val_loss"], interrupted=True)

    if state["step"] % config.eval_interval != 0 or state["val_loss"] is None:
        state["val_loss"] = validate()
        metrics.write({"step": state["step"], "val_loss": state["val_loss"], "tokens_seen": state["tokens_seen"]})
    checkpoint = save()  # always: the final state carries the final validation loss
    plot_loss_curve(metrics.records(), layout.logs / "loss_curve.png", title=f"{recipe.name}: {model.num_parameters():,} parameters")
    stats = {"checkpoint": checkpoint.name, "step": state["step"], "tokens_seen": state["tokens_seen"], "final_loss": last_loss,
             "val_loss": state["val_loss"], "parameters": model.num_parameters(), "elapsed_seconds": state["elapsed_seconds"],
             "skipped_steps": state["skipped_steps"], "device": str(device), "precision": str(dtype or "fp32")}
    write_manifest(layout.checkpoints, "pretrain", section, inputs, stats)
    return PretrainResult(checkpoint, state["step"], state["tokens_seen"], last_loss, state["val_loss"])


def _try_compile(model: Decoder):
    """torch.compile the loss when the platform supports it; otherwise fall back to eager with a note."""
    try:
        compiled = torch.compile(model.loss)
    except Exception as exc:  # compile support varies by platform and toolchain
        print(f"warning: torch.compile unavailable ({exc.__class__.__name__}); training in eager mode", file=sys.stderr)
        return model.loss

    def step(inputs, targets):
        nonlocal compiled
        try:
            return compiled(inputs, targets)
        except Exception as exc:
            print(f"warning: torch.compile failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}); training in eager mode",
                  file=sys.stderr)
            compiled = model.loss
            return compiled(inputs, targets)

    return step
