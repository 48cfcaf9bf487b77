"""Stage runners: each runs one stage of a recipe into its run folder, skipping it when up to date.

``run_all`` chains them. Each runner returns a short human-readable line for the CLI to print.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lmforge.artifacts import RunLayout, atomic_write_text, file_sha256, is_up_to_date, read_manifest, write_manifest
from lmforge.config import Recipe, recipe_to_yaml

STAGES = ("data", "tokenizer", "tokens", "pretrain", "eval", "sft")


def layout_for(recipe: Recipe, workdir: Path) -> RunLayout:
    layout = RunLayout(Path(workdir) / recipe.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.recipe, recipe_to_yaml(recipe))
    return layout


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one voice
        print(message, file=sys.stderr, flush=True)


def run_data(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False) -> str:
    from lmforge.data.stage import build_corpus, data_inputs, stage_config

    section = stage_config(recipe.data)
    if not force and is_up_to_date(layout.data, "data", section, data_inputs(recipe.data)):
        return f"data: up to date in {layout.data}"
    _say("data: reading and cleaning documents")
    stats = build_corpus(recipe.data, layout.data, progress=progress)
    return (f"data: {stats.get('kept', '?'):,} documents kept ({stats.get('train_documents', '?')} train / "
            f"{stats.get('val_documents', '?')} val) -> {layout.data}")


def run_tokenizer(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False) -> str:
    from lmforge.tokenizer.bpe import train_tokenizer

    section = recipe.tokenizer.model_dump(mode="json")
    inputs = {"data": read_manifest(layout.data, "data")["fingerprint"]}
    if not force and is_up_to_date(layout.tokenizer, "tokenizer", section, inputs):
        return f"tokenizer: up to date in {layout.tokenizer}"
    _say("tokenizer: training byte-level BPE")
    train_tokenizer(recipe.tokenizer, layout.data, layout.tokenizer, progress=progress)
    return f"tokenizer: {read_manifest(layout.tokenizer, 'tokenizer')['stats'].get('vocab_size')} tokens -> {layout.tokenizer}"


def run_tokens(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False) -> str:
    from lmforge.tokenizer.shards import TOKENS_CONFIG, encode_corpus

    inputs = {"data": read_manifest(layout.data, "data")["fingerprint"],
              "tokenizer": read_manifest(layout.tokenizer, "tokenizer")["fingerprint"]}
    if not force and is_up_to_date(layout.tokens, "tokens", TOKENS_CONFIG, inputs):
        return f"tokens: up to date in {layout.tokens}"
    _say("tokens: encoding the splits")
    stats = encode_corpus(layout.data, layout.tokenizer, layout.tokens, progress=progress)["stats"]
    return f"tokens: {stats['train_tokens']:,} train / {stats['val_tokens']:,} val tokens -> {layout.tokens}"


def run_pretrain(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False) -> str:
    from lmforge.training.pretrain import pretrain

    if not force:
        _say("pretrain: training (Ctrl-C saves a checkpoint; the same command resumes)")
    result = pretrain(recipe, layout, progress=progress, fresh=force)
    if result.interrupted:
        raise KeyboardInterrupt
    state = "up to date" if result.skipped else f"{result.step:,} steps, {result.tokens_seen:,} tokens"
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    return f"pretrain: {state}{val} -> {result.checkpoint}"


def run_eval(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False) -> str:
    from lmforge.evaluation.report import evaluate_run, summary_lines
    from lmforge.training.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(layout.root)
    section = recipe.eval.model_dump(mode="json")
    inputs = {"checkpoint": file_sha256(checkpoint / "manifest.json")}
    if not force and is_up_to_date(layout.eval, "eval", section, inputs):
        return f"eval: up to date in {layout.eval}"
    _say("eval: scoring the held-out split and sampling")
    report = evaluate_run(layout.root, recipe.eval, progress=progress, device=recipe.train.device)
    write_manifest(layout.eval, "eval", section, inputs, {k: report[k] for k in ("val_loss", "val_bits_per_byte", "step")})
    return "eval: " + "; ".join(summary_lines(report)) + f" -> {layout.eval / 'report.md'}"


def run_sft(recipe: Recipe, layout: RunLayout, progress: bool = True, force: bool = False, explicit: bool = False) -> str:
    """Chat fine-tuning; in ``lmforge run`` only when ``finetune.enabled`` (``explicit``: asked for by name)."""
    if not (explicit or recipe.finetune.enabled):
        return "sft: skipped (finetune.enabled is false; `lmforge finetune sft` fine-tunes a chat assistant)"
    from lmforge.finetune.sft import run_sft as fine_tune

    if not force:
        _say("sft: fine-tuning on conversations (Ctrl-C saves a checkpoint; the same command resumes)")
    result = fine_tune(recipe, layout, progress=progress, fresh=force)
    if result.interrupted:
        raise KeyboardInterrupt
    report, before, after = result.report, result.report["before"], result.report["after"]
    state = "up to date" if result.skipped else f"{report['training']['step']:,} steps in {report['seconds']['total']:.0f} s"
    scores = (f"; ROUGE-L {before['rougeL']:.1f} -> {after['rougeL']:.1f}, exact match {before['exact_match']:.1f} -> "
              f"{after['exact_match']:.1f} on {report['questions']} held-out questions") if "rougeL" in after else ""
    return (f"sft: {state}, held-out answer loss {before['val_loss']:.3f} -> {after['val_loss']:.3f}{scores} "
            f"-> {result.folder / 'report.md'}")


RUNNERS = {"data": run_data, "tokenizer": run_tokenizer, "tokens": run_tokens, "pretrain": run_pretrain, "eval": run_eval, "sft": run_sft}


def run_all(recipe: Recipe, layout: RunLayout, progress: bool = True, fresh: bool = False) -> list[str]:
    lines = []
    for stage in STAGES:
        line = RUNNERS[stage](recipe, layout, progress=progress, force=fresh)
        _say(line)
        lines.append(line)
    return lines
