"""The eval stage: score a checkpoint on the held-out split and on user texts, sample, write the report."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.artifacts import atomic_write_json, atomic_write_text, read_json
from lmforge.config import EvalConfig
from lmforge.errors import LmforgeError
from lmforge.evaluation.intrinsic import scores_from_totals, score_text, total_nats, unigram_bits_per_byte
from lmforge.inference.generate import SamplingParams, generate
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.training.checkpoint import load_model, resolve_checkpoint
from lmforge.training.device import resolve_device, resolve_precision

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def load_for_inference(run_or_checkpoint: Path, device: str = "auto"):
    """(model, tokenizer, checkpoint folder) from a run folder or a checkpoint folder."""
    checkpoint = resolve_checkpoint(Path(run_or_checkpoint))
    model = load_model(checkpoint, resolve_device(device)).eval()
    tokenizer = Tokenizer.load(checkpoint / "tokenizer")
    return model, tokenizer, checkpoint


def read_text_file(path: Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmforgeError(f"text file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not valid UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise LmforgeError(f"cannot read {path}: {exc.strerror}") from None


def evaluate_run(run_dir: Path, config: EvalConfig, texts: list[Path] = (), progress: bool = True, device: str = "auto") -> dict:
    """Evaluate the run's latest checkpoint; write ``eval/report.json`` and ``eval/report.md``.

    With ``texts``, only those files are scored and added to an existing report under their names.
    """
    run_dir = Path(run_dir)
    model, tokenizer, checkpoint = load_for_inference(run_dir, device)
    dtype = resolve_precision("auto", next(model.parameters()).device)
    out_dir = run_dir / "eval"
    report_path = out_dir / REPORT_JSON
    trainer_state = read_json(checkpoint / "trainer_state.json", what="trainer state")

    if texts and report_path.exists():
        report = read_json(report_path, what="eval report")
    else:
        report = {"checkpoint": str(checkpoint), "step": trainer_state["step"], "tokens_seen": trainer_state["tokens_seen"],
                  "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(include_embeddings=False)}
        tokens_dir = run_dir / "tokens"
        if not texts:
            if not (tokens_dir / "manifest.json").exists():
                raise LmforgeError(f"{run_dir} has no tokens/ with a validation split; score a file with --text FILE instead")
            report.update(_held_out_scores(model, tokens_dir, config, dtype, progress))
            report["samples"] = _samples(model, tokenizer, config)
    for path in texts:
        started = time.perf_counter()
        scores = score_text(model, tokenizer, read_text_file(path), config.batch_size, dtype)
        report.setdefault("texts", {})[Path(path).name] = {**scores.as_dict(), "path": str(path), "seconds": round(time.perf_counter() - started, 2)}
    report["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(report_path, report)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report, run_dir))
    return report


def _held_out_scores(model, tokens_dir: Path, config: EvalConfig, dtype, progress: bool) -> dict:
    meta = read_token_meta(tokens_dir)
    val = load_tokens(tokens_dir, "val")
    context = model.config.context_length
    full_windows, tail = divmod(len(val) - 1, context)
    total_batches = math.ceil(full_windows / config.batch_size) + (tail > 0)  # the partial last window is its own batch
    if config.max_batches:
        total_batches = min(total_batches, config.max_batches)
    with tqdm(total=total_batches, desc="eval", disable=not progress, file=sys.stderr) as bar:
        nats, count = total_nats(model, val, config.batch_size, meta["bos_id"], dtype, config.max_batches, progress=bar)
    all_targets = int((val[1:] != meta["bos_id"]).sum())
    # When only part of the split is scored, count the bytes of that part in proportion to its tokens.
    val_bytes = round(meta["splits"]["val"]["bytes"] * count / all_targets)
    scores = scores_from_totals(nats, count, val_bytes)
    unigram = unigram_bits_per_byte(load_tokens(tokens_dir, "train"), val, meta["vocab_size"], meta["bos_id"], meta["splits"]["val"]["bytes"])
    return {"val_loss": scores.loss, "val_perplexity": scores.perplexity, "val_bits_per_byte": scores.bits_per_byte,
            "val_tokens_scored": count, "val_fraction_scored": count / all_targets, "unigram_val_bits_per_byte": unigram,
            "bits_per_byte_vs_unigram": scores.bits_per_byte / unigram}


def _samples(model, tokenizer, config: EvalConfig) -> list[dict]:
    samples = []
    for index, prompt in enumerate(config.prompts):
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                                seed=config.seed + index)
        samples.append({"prompt": prompt, "completion": "".join(generate(model, tokenizer, prompt, params))})
    return samples


def render_markdown(report: dict, run_dir: Path) -> str:
    lines = [f"# Evaluation of `{run_dir.name}`", "", f"Checkpoint `{report['checkpoint']}` (step {report['step']:,}, "
             f"{report['tokens_seen']:,} tokens seen, {report['parameters']:,} parameters).", ""]
    if "val_loss" in report:
        lines += ["## Held-out split", "", "| metric | value |", "| --- | --- |",
                  f"| validation loss (nats/token) | {report['val_loss']:.4f} |",
                  f"| validation perplexity | {report['val_perplexity']:.2f} |",
                  f"| validation bits per byte | {report['val_bits_per_byte']:.4f} |",
                  f"| unigram baseline bits per byte | {report['unigram_val_bits_per_byte']:.4f} |",
                  f"| fraction of the split scored | {report['val_fraction_scored']:.0%} |", ""]
    if report.get("texts"):
        lines += ["## Texts", "", "| file | loss | perplexity | bits per byte | tokens |", "| --- | --- | --- | --- | --- |"]
        for name, scores in report["texts"].items():
            lines.append(f"| {name} | {scores['loss']:.4f} | {scores['perplexity']:.2f} | {scores['bits_per_byte']:.4f} | {scores['tokens']:,} |")
        lines.append("")
    if report.get("samples"):
        lines += ["## Samples", ""]
        for sample in report["samples"]:
            lines += [f"**{sample['prompt']}**", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    if (run_dir / "logs" / "loss_curve.png").exists():
        lines += ["## Training curve", "", "![loss curve](../logs/loss_curve.png)", ""]
    return "\n".join(lines)
