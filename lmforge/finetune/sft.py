"""The SFT stage: fine-tune a run's pretrained model into an assistant, through the shared training loop.

``run_sft`` reads the run's final pretrained checkpoint and the conversations (the built-in stdlib
questions or a JSONL file), holds some out, scores the base model on them, trains (``SftObjective`` in
``training.loop.TrainingLoop``: full fine-tuning, frozen first layers or LoRA), scores the result the
same way and writes ``RUN/sft/``:

    data/train.jsonl, data/val.jsonl   the conversations used, as rendered into training rows
    checkpoints/step_N/                self-contained checkpoints (what serving and chat load)
    adapter/                           with LoRA: adapter.safetensors + adapter_config.json
    logs/metrics.jsonl                 the training curve (and TensorBoard, loss_curve.png)
    answers.jsonl                      each scored question with the answers before and after
    report.json, report.md             validation loss and ROUGE-L / exact match, before and after
    manifest.json                      written last: a rerun with the same inputs is skipped
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.artifacts import RunLayout, atomic_write_json, atomic_write_text, file_sha256, is_up_to_date, read_json, read_manifest, write_manifest
from lmforge.config import Recipe, TrainConfig
from lmforge.errors import LmforgeError
from lmforge.finetune import lora
from lmforge.finetune.conversations import Conversation, PackedRows, pack, read_conversations, render_all, split_conversations, write_conversations
from lmforge.models.decoder import Decoder
from lmforge.tokenizer.bpe import END, Tokenizer
from lmforge.training.batches import TrainBatches
from lmforge.training.checkpoint import FINETUNED_DIR, latest_valid_checkpoint, load_model, load_training_state, read_model_config, save_checkpoint
from lmforge.training.device import autocast, resolve_device, resolve_precision
from lmforge.training.distributed import Ranks
from lmforge.training.loop import TrainingLoop

STAGE = "sft"
SHOWN_EXAMPLES = 8  # questions quoted in report.md
SHOWN_SKIPPED = 20  # skipped lines listed in report.json (all are counted)


@dataclass
class SftResult:
    folder: Path
    checkpoint: Path
    report: dict
    skipped: bool = False
    interrupted: bool = False


def sft_folder(layout: RunLayout) -> Path:
    return layout.root / FINETUNED_DIR


def sft_train_config(recipe: Recipe) -> TrainConfig:
    """The training loop's settings for SFT: the recipe's train section (device, precision, guards) with
    the finetune section's budget, batch and optimizer."""
    tune = recipe.finetune
    return recipe.train.model_copy(update={
        "max_steps": tune.max_steps, "max_tokens": None, "max_minutes": tune.max_minutes, "batch_size": tune.batch_size,
        "grad_accum_steps": 1, "learning_rate": tune.learning_rate, "schedule": "cosine", "warmup_steps": tune.warmup_steps,
        "optimizer": "adamw", "weight_decay": tune.weight_decay, "eval_interval": tune.eval_interval, "keep_checkpoints": 1,
        # The assistant is the last checkpoint (serving loads the latest): no best-checkpoint saves mid-run.
        "keep_best_checkpoint": False, "early_stopping_patience": None,
    })


class PackedBatches(TrainBatches):
    """Training rows in the order pretraining reads its windows: a fresh seeded permutation every epoch,
    so the data position is just the number of samples consumed and a resume replays it exactly."""

    def __init__(self, rows: PackedRows, seed: int):
        self.inputs, self.targets = rows.inputs_and_targets()
        self.seed, self.n_windows = seed, len(self.inputs)
        self._epoch, self._order = -1, None

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.window_ids(first_sample, batch_size)
        return self.inputs[ids], self.targets[ids]


def assistant_loss(model: Decoder, rows: PackedRows, batch_size: int, dtype=None) -> float:
    """Mean next-token loss (nats) over the trained tokens of ``rows``: the held-out assistant answers."""
    inputs, targets = rows.inputs_and_targets()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch_targets = targets[start : start + batch_size].to(device)
            with autocast(device, dtype):
                nats += model.loss(inputs[start : start + batch_size].to(device), batch_targets, reduction="sum").item()
            count += int((batch_targets != -100).sum())
    model.train(was_training)
    return nats / max(count, 1)


class SftObjective:
    """The run's pretrained model, wrapped for the chosen kind of fine-tuning, trained on packed conversations."""

    stage = "sft-train"
    settings = "finetune"
    resume_key = "sft_inputs"
    resume_mismatch = "other conversations, another base model or other fine-tuning settings"

    def __init__(self, recipe: Recipe, base_checkpoint: Path, folder: Path, train_rows: PackedRows, val_rows: PackedRows,
                 section: dict, inputs: dict):
        self.recipe, self.config = recipe, recipe.finetune
        self.base_checkpoint = base_checkpoint
        self.checkpoints, self.logs = folder / "checkpoints", folder / "logs"
        self.train_rows, self.val_rows = train_rows, val_rows
        self.section, self.inputs = section, inputs
        self.resume_value = resume_fingerprint(section, inputs)
        self.wrapped: list[str] = []

    def build_model(self, device: torch.device) -> Decoder:
        model = load_model(self.base_checkpoint, device)
        config = self.config
        if config.lora_rank:
            self.wrapped = lora.apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.freeze_layers)
        elif config.freeze_layers:
            lora.freeze_layers(model, config.freeze_layers)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tuning"
        self.title = f"{self.recipe.name} SFT ({kind}): {trainable:,} of {model.num_parameters():,} parameters trained"
        return model

    def batches(self, model: Decoder) -> PackedBatches:
        return PackedBatches(self.train_rows, self.recipe.train.seed)

    def validate(self, model: Decoder, batch_size: int, dtype) -> float:
        return assistant_loss(model, self.val_rows, batch_size, dtype)

    def save(self, step: int, model: Decoder, optimizer, state: dict, ranks: Ranks) -> Path:
        export = self._export if self.config.lora_rank else None
        return save_checkpoint(self.checkpoints, step, model, optimizer, state, self.base_checkpoint / "tokenizer", 1, ranks, export=export)

    def _export(self, weights: dict) -> tuple[dict, dict[str, bytes]]:
        """A LoRA model's checkpoint: merged (or base) weights in model.safetensors, the adapter beside them.

        The adapter is kept even when merged, so training can resume from it."""
        from safetensors.torch import save

        config = self.config
        base, adapter = lora.split_state(weights)
        kept = lora.merged_state(weights, config.lora_alpha / config.lora_rank) if config.merge_adapter else base
        settings = lora.adapter_config(config.lora_rank, config.lora_alpha, config.lora_targets, self.wrapped, config.merge_adapter,
                                       str(self.base_checkpoint))
        files = {lora.ADAPTER_WEIGHTS: save({k: v.contiguous() for k, v in adapter.items()}),
                 lora.ADAPTER_CONFIG: (json.dumps(settings, indent=2) + "\n").encode()}
        return kept, files

    def resume(self, folder: Path | None, model: Decoder, optimizer, ranks: Ranks) -> dict:
        if not self.config.lora_rank:
            return load_training_state(folder, model, optimizer, ranks)

        def wrapped_weights(checkpoint: Path) -> dict:
            # The base weights never train under LoRA: they are the pretrained ones the model was built
            # from (the checkpoint's may be merged); the adapter comes from the checkpoint.
            base = {name: tensor for name, tensor in model.state_dict().items() if ".lora_" not in name}
            _, adapter = lora.read_adapter(checkpoint)
            return {**base, **{name.removeprefix(lora.PEFT_PREFIX): tensor for name, tensor in adapter.items()}}

        return load_training_state(folder, model, optimizer, ranks, weights_of=wrapped_weights)


def resume_fingerprint(section: dict, inputs: dict) -> str:
    from lmforge.artifacts import fingerprint

    shape = {key: section["finetune"][key] for key in ("lora_rank", "lora_alpha", "lora_targets", "freeze_layers", "pack", "eval_fraction")}
    return fingerprint(shape, inputs)


def load_conversations(recipe: Recipe, tokenizer: Tokenizer, context_length: int, progress: bool) -> tuple[list[Conversation], dict]:
    """The recipe's conversations and what reading them reported (counts, skipped lines)."""
    dataset = recipe.finetune.dataset
    if dataset == "stdlib":
        from lmforge.finetune.stdlib_qa import builtin_conversations

        conversations, counts = builtin_conversations(tokenizer, context_length, progress=progress)
        return conversations, {"dataset": "stdlib (built-in questions about standard-library functions and classes)", **counts}
    conversations, skipped = read_conversations(Path(dataset))
    if skipped:
        _say(f"sft: skipped {len(skipped)} of {len(conversations) + len(skipped)} lines of {dataset} (first: {skipped[0]})")
    return conversations, {"dataset": str(dataset), "lines_skipped": len(skipped), "skipped": [str(s) for s in skipped[:SHOWN_SKIPPED]],
                           "conversations": len(conversations)}


def dataset_fingerprint(dataset: str) -> str:
    if dataset == "stdlib":
        from lmforge.finetune.stdlib_qa import builtin_fingerprint

        return builtin_fingerprint()
    path = Path(dataset)
    if not path.is_file():
        raise LmforgeError(f"conversations file not found: {path}" if not path.exists() else f"{path} is a folder; expected a JSONL file")
    return file_sha256(path)


def base_checkpoint_of(layout: RunLayout) -> Path:
    """The run's final pretrained checkpoint (pretraining must have finished)."""
    stats = read_manifest(layout.checkpoints, "pretrain")["stats"]
    return layout.checkpoints / stats["checkpoint"]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_sft(recipe: Recipe, layout: RunLayout, progress: bool = True, fresh: bool = False, on_eval=None) -> SftResult:
    """Fine-tune the run's pretrained model on the recipe's conversations; see the module docstring for what is written.

    ``on_eval(step, val_loss)`` is called after each validation during training, as ``pretrain`` does.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("lmforge finetune sft runs on one process; start it without torchrun")
    folder = sft_folder(layout)
    base = base_checkpoint_of(layout)
    section = {"finetune": recipe.finetune.model_dump(mode="json", exclude={"enabled"}), "seed": recipe.train.seed,
               "precision": recipe.train.precision}
    inputs = {"checkpoint": file_sha256(base / "manifest.json"), "dataset": dataset_fingerprint(recipe.finetune.dataset)}
    if not fresh and is_up_to_date(folder, STAGE, section, inputs):
        report = read_json(folder / "report.json", what="SFT report")
        return SftResult(folder, folder / "checkpoints" / report["checkpoint"], report, skipped=True)
    started = time.perf_counter()
    (folder / "manifest.json").unlink(missing_ok=True)
    fresh = fresh or _stale_checkpoints(folder, resume_fingerprint(section, inputs))

    tokenizer = Tokenizer.load(base / "tokenizer")
    data = prepare_data(recipe, tokenizer, read_model_config(base).context_length, folder, progress)
    device = resolve_device(recipe.train.device)
    _say(f"sft: {data.report['train_conversations']:,} conversations to train on ({data.report['train_rows']:,} rows), "
         f"{data.report['held_out_conversations']:,} held out; scoring the base model on {len(data.questions)} held-out questions")
    scoring_started = time.perf_counter()
    before = evaluate(load_model(base, device), tokenizer, data, recipe)
    scoring_seconds = time.perf_counter() - scoring_started

    objective = SftObjective(recipe, base, folder, data.train_rows, data.val_rows, section, inputs)
    result = TrainingLoop(objective, sft_train_config(recipe), Ranks(), recipe.train.device, progress, on_eval).run(fresh)
    if result.interrupted:
        return SftResult(folder, result.checkpoint, {}, interrupted=True)

    scoring_started = time.perf_counter()
    after = evaluate(load_model(result.checkpoint, device), tokenizer, data, recipe)  # loaded as serving loads it
    scoring_seconds += time.perf_counter() - scoring_started
    if recipe.finetune.lora_rank:
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        for name in (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG):
            shutil.copyfile(result.checkpoint / name, folder / "adapter" / name)

    training = read_manifest(objective.checkpoints, objective.stage)["stats"]
    seconds = {"total": round(time.perf_counter() - started, 1), "training": round(training["elapsed_seconds"], 1),
               "scoring": round(scoring_seconds, 1)}
    report = write_report(recipe.name, folder, base, result.checkpoint, section, data, training, before, after, seconds)
    write_manifest(folder, STAGE, section, inputs, {key: report[key] for key in ("checkpoint", "before", "after", "seconds")})
    return SftResult(folder, result.checkpoint, report)


@dataclass
class SftData:
    """The conversations split, rendered and packed, and what was done to them (for the report)."""

    train_rows: PackedRows
    val_rows: PackedRows
    questions: list[Conversation]  # the held-out conversations whose last answer is scored
    report: dict


def prepare_data(recipe: Recipe, tokenizer: Tokenizer, context: int, folder: Path, progress: bool) -> SftData:
    """Read, split (by hash), shuffle, save (``data/``), render and pack the recipe's conversations."""
    conversations, reading = load_conversations(recipe, tokenizer, context, progress)
    train, held_out = split_conversations(conversations, recipe.finetune.eval_fraction)
    random.Random(recipe.train.seed).shuffle(train)
    write_conversations(folder / "data" / "train.jsonl", train)
    write_conversations(folder / "data" / "val.jsonl", held_out)
    # A row holds context + 1 tokens: the inputs and, shifted by one, the targets.
    train_rendered, train_stats = render_all(tokenizer, train, context + 1)
    val_rendered, val_stats = render_all(tokenizer, held_out, context + 1)
    if not train_rendered or not val_rendered:
        raise LmforgeError(f"{len(conversations)} conversations leave {len(train_rendered)} to train on and {len(val_rendered)} held out "
                           f"that fit the model's context of {context} tokens; both need at least one (add conversations, or change "
                           "finetune.eval_fraction)")
    train_rows = pack(train_rendered, context + 1, tokenizer.pad_id, recipe.finetune.pack)
    val_rows = pack(val_rendered, context + 1, tokenizer.pad_id, recipe.finetune.pack)
    report = {**reading, "train_conversations": len(train), "held_out_conversations": len(held_out),
              "train_rows": len(train_rows.tokens), "val_rows": len(val_rows.tokens),
              "train_tokens": train_stats.tokens, "train_assistant_tokens": train_stats.trained_tokens,
              "truncated": train_stats.truncated + val_stats.truncated, "too_long": train_stats.too_long + val_stats.too_long,
              "too_long_examples": (train_stats.skipped + val_stats.skipped)[:SHOWN_SKIPPED]}
    return SftData(train_rows, val_rows, held_out[: recipe.finetune.eval_questions], report)


def evaluate(model: Decoder, tokenizer: Tokenizer, data: SftData, recipe: Recipe) -> dict:
    """Held-out assistant-token loss, and the scores (and answers) of the held-out questions."""
    dtype = resolve_precision(recipe.train.precision, next(model.parameters()).device)
    return {"val_loss": assistant_loss(model, data.val_rows, recipe.finetune.batch_size, dtype),
            **score_answers(model, tokenizer, data.questions, recipe.finetune.max_new_tokens)}


def write_report(name: str, folder: Path, base: Path, checkpoint: Path, section: dict, data: SftData, training: dict,
                 before: dict, after: dict, seconds: dict) -> dict:
    """answers.jsonl, report.json and report.md; returns the report."""
    report = {
        "checkpoint": checkpoint.name, "base_checkpoint": str(base), "settings": section["finetune"], "data": data.report,
        "training": {key: training.get(key) for key in ("step", "tokens_seen", "elapsed_seconds", "final_loss", "parameters",
                                                        "trainable_parameters", "device", "precision")},
        "questions": len(data.questions),
        "before": {key: value for key, value in before.items() if key != "answers"},
        "after": {key: value for key, value in after.items() if key != "answers"},
        "seconds": seconds,
    }
    rows = [{"question": question_text(q), "reference": a["reference"], "before": a["prediction"], "after": b["prediction"],
             "source": q.source} for q, a, b in zip(data.questions, before.get("answers", []), after.get("answers", []))]
    atomic_write_text(folder / "answers.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    atomic_write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", report_markdown(name, report, rows))
    return report


def _stale_checkpoints(folder: Path, expected: str) -> bool:
    """True when the newest SFT checkpoint was trained from other inputs or settings: start again rather
    than fail, since a longer pretraining or a new dataset makes the old fine-tune obsolete."""
    latest = latest_valid_checkpoint(folder / "checkpoints", warn=False)
    if latest is None:
        return False
    state = read_json(latest / "trainer_state.json", what="trainer state")
    if state.get(SftObjective.resume_key) == expected:
        return False
    _say(f"sft: {latest} was trained from other inputs or settings; fine-tuning from the start")
    return True


def prompt_and_reference(conversation: Conversation) -> tuple[list[dict], str]:
    """The messages before the last assistant answer, and that answer."""
    messages = list(conversation.messages)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def question_text(conversation: Conversation) -> str:
    """What the scored answer replies to: the message before it (empty if the answer opens the conversation)."""
    prompt, _ = prompt_and_reference(conversation)
    return prompt[-1]["content"] if prompt else ""


def score_answers(model: Decoder, tokenizer: Tokenizer, questions: list[Conversation], max_new_tokens: int,
                  batch_size: int = 16) -> dict:
    """Answer each held-out question as the server would (the inference engine, greedy, ending at <|end|>)
    and score ROUGE-L, exact match, token F1 and chrF (0-100) against the reference answers.

    A prompt too long to leave room for an answer keeps its end (the question is what the answer follows).
    """
    from lmforge.evaluation.task_metrics import generation_metrics
    from lmforge.inference.engine import Engine
    from lmforge.inference.generate import SamplingParams

    if not questions:
        return {}
    context = model.config.context_length
    budget = min(max_new_tokens, context // 2)
    end_id = tokenizer.token_id(END)
    # Not started: stop() below runs the engine's batched steps in this thread until every answer is done.
    engine = Engine(model, tokenizer, max_batch_size=batch_size, max_queue=len(questions))
    handles, references, truncated = [], [], 0
    for conversation in questions:
        prompt, reference = prompt_and_reference(conversation)
        ids = tokenizer.encode_chat(prompt, add_generation_prompt=True)
        if 1 + len(ids) + budget > context:
            ids, truncated = ids[-(context - budget - 1):], truncated + 1
        prompt_ids = [tokenizer.bos_id] + ids
        params = SamplingParams(max_new_tokens=min(max_new_tokens, context - len(prompt_ids)), temperature=0, stop_token_ids=[end_id])
        handles.append(engine.submit(prompt_ids, params))
        references.append(reference)
    engine.stop(drain=True)
    answers = [{"prediction": handle.result.text.strip(), "reference": reference} for handle, reference in zip(handles, references)]
    metrics = generation_metrics([a["prediction"] for a in answers], [[a["reference"]] for a in answers])
    return {"rougeL": metrics["rougeL"], "exact_match": metrics["exact_match"], "f1": metrics["f1"], "chrf": metrics["chrf"],
            "truncated_prompts": truncated, "answers": answers}


def report_markdown(name: str, report: dict, rows: list[dict]) -> str:
    before, after, data = report["before"], report["after"], report["data"]
    lines = [f"# Chat fine-tuning (SFT) of `{name}`", "",
             f"Base: `{report['base_checkpoint']}`; fine-tuned: `checkpoints/{report['checkpoint']}`, "
             f"{report['training']['step']:,} steps in {report['seconds']['training']:.0f} s "
             f"({report['training']['trainable_parameters']:,} of {report['training']['parameters']:,} parameters trained).", "",
             f"Data: {data['dataset']}; {data['train_conversations']:,} conversations trained on, {data['held_out_conversations']:,} held out.", "",
             "| held out | before | after |", "| --- | --- | --- |",
             f"| assistant-token loss (nats) | {before['val_loss']:.4f} | {after['val_loss']:.4f} |"]
    if "rougeL" in before:
        lines += [f"| ROUGE-L ({report['questions']} questions, greedy) | {before['rougeL']:.1f} | {after['rougeL']:.1f} |",
                  f"| exact match | {before['exact_match']:.1f} | {after['exact_match']:.1f} |",
                  f"| token F1 | {before['f1']:.1f} | {after['f1']:.1f} |"]
    if rows:
        lines += ["", "## Held-out questions", ""]
        for row in rows[:SHOWN_EXAMPLES]:
            lines += [f"**{row['question']}**", "", f"- reference: {row['reference']}", f"- before: {row['before'] or '(nothing)'}",
                      f"- after: {row['after'] or '(nothing)'}", ""]
        lines.append("Every question with both answers: `answers.jsonl`. Scores: ROUGE-L F-measure and SQuAD-style exact match, 0-100.")
    return "\n".join(lines) + "\n"
