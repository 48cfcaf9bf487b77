"""The eval stage: score a checkpoint on the held-out split and on user texts, sample, write the report."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from lmforge.artifacts import atomic_write_json, atomic_write_text, read_json
from lmforge.config import EvalConfig, EvalTask
from lmforge.errors import LmforgeError
from lmforge.evaluation.files import read_jsonl_objects, read_text_file, string_field
from lmforge.evaluation.intrinsic import score_document_texts, score_documents, score_text_paragraphs, unigram_bits_per_byte
from lmforge.inference.generate import SamplingParams, generate
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.shards import load_tokens, read_token_meta
from lmforge.training.checkpoint import COMMIT_MARKER, load_model, resolve_chat_checkpoint, resolve_checkpoint
from lmforge.training.device import resolve_device, resolve_precision

REPORT_JSON, REPORT_MD = "report.json", "report.md"


def load_for_inference(run_or_checkpoint: Path, device: str = "auto", prefer_finetuned: bool = False):
    """(model, tokenizer, checkpoint folder) from a run folder or a checkpoint folder.

    With ``prefer_finetuned`` a run folder gives its chat fine-tuned checkpoint when it has one
    (serving and chat); otherwise the pretrained one (evaluation, export).
    """
    if prefer_finetuned:
        checkpoint = resolve_chat_checkpoint(Path(run_or_checkpoint))[0]
    else:
        checkpoint = resolve_checkpoint(Path(run_or_checkpoint))
    model = load_model(checkpoint, resolve_device(device)).eval()
    tokenizer = Tokenizer.load(checkpoint / "tokenizer")
    return model, tokenizer, checkpoint


def run_folder_of(path: Path) -> Path:
    """The run folder a run, checkpoints/ or checkpoint path belongs to (where eval/ is written)."""
    path = Path(path)
    if (path / COMMIT_MARKER).exists() and path.parent.name == "checkpoints":
        return path.parent.parent
    if path.name == "checkpoints":
        return path.parent
    return path


def evaluate_run(run_dir: Path, config: EvalConfig, texts: list[Path] = (), tasks: list[EvalTask] = (), progress: bool = True,
                 device: str = "auto", checkpoint: Path | None = None, samples: bool = True) -> dict:
    """Evaluate a checkpoint of a run (the latest by default); write ``eval/report.json`` and ``eval/report.md``.

    A full evaluation scores the held-out split, the built-in task and the recipe's tasks, and samples
    the fixed prompts. With ``texts`` or ``tasks`` only those are scored, added to the existing report
    under their names. Every full evaluation is also appended to ``eval/history.jsonl``, the table over
    checkpoints.
    """
    given = Path(run_dir)
    run_dir = run_folder_of(given)
    if checkpoint is None and given != run_dir and given.name != "checkpoints":
        checkpoint = given  # a checkpoint folder was named: evaluate that one, report into its run
    model, tokenizer, checkpoint = load_for_inference(checkpoint or run_dir, device)
    dtype = resolve_precision("auto", next(model.parameters()).device)
    out_dir = run_dir / "eval"
    report_path = out_dir / REPORT_JSON
    trainer_state = read_json(checkpoint / "trainer_state.json", what="trainer state")
    stride = _stride(config, model.config.context_length)
    additions_only = bool(texts or tasks)
    # Check every requested file before the long scoring, so a typo does not cost the held-out work.
    for path in texts:
        read_text_file(path)
    all_tasks = [*tasks] if additions_only else [*config.tasks]
    for task in all_tasks:
        check_task(task)
    names = task_names(all_tasks)
    scored_by = {"checkpoint": str(checkpoint), "step": trainer_state["step"]}

    if additions_only and report_path.exists():
        report = read_json(report_path, what="eval report")
    else:
        report = {"checkpoint": str(checkpoint), "step": trainer_state["step"], "tokens_seen": trainer_state["tokens_seen"],
                  "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(include_embeddings=False)}
        if not additions_only:
            tokens_dir = run_dir / "tokens"
            if not (tokens_dir / "manifest.json").exists():
                raise LmforgeError(f"{run_dir} has no tokens/ with a validation split; score a file with --text FILE instead")
            report["held_out"] = _held_out_scores(model, tokenizer, tokens_dir, config, stride, dtype, progress)
            report.update(_legacy_keys(report["held_out"]))
            builtin, report["builtin_task"] = _builtin_task(run_dir, config, tokenizer, model.config.context_length)
            all_tasks = [*builtin, *all_tasks]
            names = task_names(all_tasks)
            if samples:
                report["samples"] = _samples(model, tokenizer, config)
    for path in texts:
        started = time.perf_counter()
        scores = _text_scores(model, tokenizer, Path(path), config, stride, dtype)
        report.setdefault("texts", {})[_text_name(report, Path(path))] = {
            **scores, "path": str(path), **scored_by, "seconds": round(time.perf_counter() - started, 2)}
    for task, name in zip(all_tasks, names):
        started = time.perf_counter()
        result = run_task(model, tokenizer, task, config, out_dir, progress, name)
        report.setdefault("tasks", {})[name] = {**result, **scored_by, "seconds": round(time.perf_counter() - started, 2)}
    report["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not additions_only:
        append_history(out_dir, report)
    report["history"] = read_history(out_dir)
    plot = plot_validation_loss(run_dir, report["history"], out_dir / "val_loss_vs_tokens.png")
    report["plots"] = {"val_loss_vs_tokens": plot.name} if plot else {}
    atomic_write_json(report_path, report)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report, run_dir))
    return report


def _stride(config: EvalConfig, context_length: int) -> int:
    stride = config.stride or max(context_length // 2, 1)
    if stride > context_length:
        raise LmforgeError(f"eval.stride is {stride} but the model's context is {context_length} tokens; use at most {context_length}")
    return stride


def _legacy_keys(held_out: dict) -> dict:
    """The flat keys earlier reports had (and the pipeline's summary line reads)."""
    return {"val_loss": held_out["loss"], "val_perplexity": held_out["perplexity"], "val_bits_per_byte": held_out["bits_per_byte"],
            "val_bits_per_char": held_out["bits_per_char"], "unigram_val_bits_per_byte": held_out["unigram_bits_per_byte"]}


def _held_out_scores(model, tokenizer, tokens_dir: Path, config: EvalConfig, stride: int, dtype, progress: bool) -> dict:
    meta = read_token_meta(tokens_dir)
    val = np.asarray(load_tokens(tokens_dir, "val"))
    context = model.config.context_length
    all_targets = int((val[1:] != meta["bos_id"]).sum())
    if config.max_batches:
        # As many windows as max_batches batches hold; the bytes and characters are those of the part scored.
        windows = config.max_batches * config.batch_size
        val = val[: context + 1 + (windows - 1) * stride]
    documents = score_documents(model, tokenizer, val, stride=stride, batch_size=config.batch_size, dtype=dtype, progress=progress)
    scores = documents.summary(config.bootstrap_samples, config.confidence, config.seed)
    unigram = unigram_bits_per_byte(load_tokens(tokens_dir, "train"), load_tokens(tokens_dir, "val"), meta["vocab_size"], meta["bos_id"],
                                    meta["splits"]["val"]["bytes"])
    return {**scores, "fraction_scored": scores["tokens"] / all_targets, "unigram_bits_per_byte": unigram,
            "bits_per_byte_vs_unigram": scores["bits_per_byte"] / unigram}


def _text_name(report: dict, path: Path) -> str:
    """The file's name, or its parent/name when another file of that name was scored already."""
    earlier = report.get("texts", {}).get(path.name)
    if earlier is None or Path(earlier["path"]).resolve() == path.resolve():
        return path.name
    return f"{path.parent.name}/{path.name}"


def _text_scores(model, tokenizer, path: Path, config: EvalConfig, stride: int, dtype) -> dict:
    """A .jsonl(.gz) file is a set of documents (its ``text`` field); any other file is one text, bootstrapped by paragraph."""
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        documents = score_document_texts(model, tokenizer, read_jsonl_texts(path), stride, config.batch_size, dtype)
        unit = "document"
    else:
        text = read_text_file(path)
        if not text.strip():
            raise LmforgeError(f"{path} is empty: there is no text to score")
        documents = score_text_paragraphs(model, tokenizer, text, stride, config.batch_size, dtype)
        unit = "paragraph"
    return {**documents.summary(config.bootstrap_samples, config.confidence, config.seed), "bootstrap_unit": unit}


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    return [string_field(record, field, f"{path}:{number}") for number, record in read_jsonl_objects(path, "document")]


BUILTIN_TASK = "stdlib-cloze"


def _builtin_task(run_dir: Path, config: EvalConfig, tokenizer, context_length: int) -> tuple[list[EvalTask], dict | None]:
    """The built-in multiple-choice task, made from the run's documents, and how it was made.

    The questions are rebuilt when the documents, the settings or the model's context change. Items
    whose choices take more than half the context are dropped, so every question is scored with at least
    as much context as answer. A corpus that yields no questions (too few documents, little prose)
    skips the task with a note instead of failing the evaluation.
    """
    data_manifest = run_dir / "data" / "manifest.json"
    if not config.builtin_task or not data_manifest.exists():
        return [], None
    from lmforge.evaluation.benchmarks import build_stdlib_cloze

    path = run_dir / "eval" / f"{BUILTIN_TASK}.jsonl"
    info_path = path.with_suffix(".json")
    settings = {"items": config.builtin_task_items, "seed": config.seed, "context_length": context_length,
                "data": read_json(data_manifest, what="data manifest").get("fingerprint")}
    info = read_json(info_path, what="built-in task settings") if info_path.exists() and path.exists() else {}
    if info.get("settings") != settings:
        built = run_dir / "eval" / f".{BUILTIN_TASK}.all.jsonl"
        try:
            made = build_stdlib_cloze(run_dir / "data", built, n_items=config.builtin_task_items, seed=config.seed)
        except LmforgeError as exc:
            note = f"built-in task skipped: {exc}"
            print(f"eval: {note}", file=sys.stderr)
            return [], {"skipped": note}
        lines = [line for line in built.read_text(encoding="utf-8").splitlines()
                 if max(len(tokenizer.encode(" " + choice)) for choice in json.loads(line)["choices"]) <= context_length // 2]
        built.unlink()
        if not lines:
            note = f"built-in task skipped: every question is too long for a {context_length}-token context"
            print(f"eval: {note}", file=sys.stderr)
            return [], {"skipped": note}
        atomic_write_text(path, "\n".join(lines) + "\n")
        made = {key: made[key] for key in ("items_by_split", "splits", "note") if key in made}
        info = {"settings": settings, **made, "items": len(lines), "dropped_as_too_long": sum(made["items_by_split"].values()) - len(lines)}
        atomic_write_json(info_path, info)
    return [EvalTask(format="mc", path=path, name=BUILTIN_TASK)], info


def check_task(task: EvalTask) -> None:
    """Read a task's files now, so a missing or malformed file fails before any scoring."""
    if task.format == "generation":
        from lmforge.evaluation.task_metrics import read_generation_examples

        read_generation_examples(task.path)
    elif task.format == "classification":
        from lmforge.evaluation.task_metrics import fill_template

        read_jsonl_objects(task.path, "classification")
        fill_template(task.template, "")
    else:
        from lmforge.evaluation.benchmarks import load_benchmark

        load_benchmark(task.path, task.format, task.num_fewshot, task.fewshot_path, task.limit)


def task_names(tasks: list[EvalTask]) -> list[str]:
    """Report names: ``format:file``, or ``format:folder/file`` where two tasks share a file name; never two alike."""
    names = [task.display_name for task in tasks]
    shared = {name for name in names if names.count(name) > 1}
    names = [f"{task.format}:{Path(task.path).parent.name}/{Path(task.path).name}" if task.name is None and name in shared else name
             for task, name in zip(tasks, names)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LmforgeError(f"two tasks would both be reported as {repeated[0]!r}; give them different names (eval.tasks[].name)")
    return names


EXAMPLES_IN_REPORT = 3


def run_task(model, tokenizer, task: EvalTask, config: EvalConfig, out_dir: Path | None = None, progress: bool = False,
             name: str | None = None) -> dict:
    """Score one task file: ``{"format", "path", "num_fewshot", "metrics", "examples"}``.

    The report keeps a few examples; with ``out_dir``, every item's prediction and scores go to
    ``out_dir/tasks/<name>.jsonl``.
    """
    if not Path(task.path).is_file():
        raise LmforgeError(f"task file not found: {task.path}")
    if task.format == "generation":
        from lmforge.evaluation.task_metrics import evaluate_generation, read_generation_examples

        examples = read_generation_examples(task.path)[: task.limit]
        # At most half the window goes to the answer, so a small model keeps room for the prompt.
        max_new_tokens = min(task.max_new_tokens, model.config.context_length // 2)
        result = evaluate_generation(model, tokenizer, examples, max_new_tokens=max_new_tokens, progress=progress)
        metrics, rows = {**result["metrics"], "max_new_tokens": max_new_tokens}, result["examples"]
    elif task.format == "classification":
        from lmforge.evaluation import task_metrics

        if task_metrics.has_predictions(task.path):  # a classifier's own answers: scored as given, no prompting
            result = task_metrics.evaluate_classification_predictions(task.path, task.options, task.limit)
        else:
            examples = task_metrics.read_classification_examples(task.path)[: task.limit]
            result = task_metrics.evaluate_classification(model, tokenizer, examples, options=task.options, template=task.template,
                                                          batch_size=config.batch_size)
        metrics, rows = {**result["metrics"], "options": result["options"]}, result["examples"]
    else:
        from lmforge.evaluation.benchmarks import evaluate_benchmark

        result = evaluate_benchmark(model, tokenizer, task.path, task.format, num_fewshot=task.num_fewshot,
                                    fewshot_path=task.fewshot_path, limit=task.limit, batch_size=config.batch_size, progress=progress)
        rows = result.pop("records")
        settings = ("format", "path", "num_fewshot", "fewshot_path", "limit", "seed", "seconds")
        metrics = {key: value for key, value in result.items() if key not in settings}
    summary = {"format": task.format, "path": str(task.path), "num_fewshot": task.num_fewshot, "metrics": metrics,
               "examples": rows[:EXAMPLES_IN_REPORT]}
    if out_dir is not None:
        safe_name = re.sub(r"\.(jsonl|json|parquet)(\.gz)?$", "", re.sub(r"[^A-Za-z0-9_.-]+", "_", name or task.display_name))
        atomic_write_text(Path(out_dir) / "tasks" / f"{safe_name}.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        summary["items_file"] = f"tasks/{safe_name}.jsonl"
    return summary


HISTORY = "history.jsonl"


def append_history(out_dir: Path, report: dict) -> None:
    """One line per full evaluation: the checkpoint and its headline numbers."""
    entry = {key: report.get(key) for key in ("checkpoint", "step", "tokens_seen", "created_at")}
    held_out = report.get("held_out", {})
    entry.update({key: held_out.get(key) for key in ("loss", "perplexity", "bits_per_byte", "bits_per_char", "stride")})
    entry["bits_per_byte_interval"] = held_out.get("interval", {}).get("bits_per_byte")
    entry["tasks"] = {name: headline_metric(result) for name, result in report.get("tasks", {}).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / HISTORY, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def read_history(out_dir: Path) -> list[dict]:
    """Earlier evaluations of this run, the latest per checkpoint step, oldest step first."""
    from lmforge.training.metrics import read_jsonl_records

    path = Path(out_dir) / HISTORY
    latest: dict = {}
    for record in read_jsonl_records(path) if path.exists() else []:
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            latest[record["step"]] = record
    return [latest[step] for step in sorted(latest)]


def summary_lines(report: dict) -> list[str]:
    """One line for the held-out scores, one per scored text and one per task."""
    lines = []
    held_out = report.get("held_out")
    if held_out:
        interval = held_out.get("interval", {}).get("bits_per_byte")
        spread = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        lines.append(f"validation loss {held_out['loss']:.4f}, perplexity {held_out['perplexity']:.1f}, "
                     f"{held_out['bits_per_byte']:.3f}{spread} bits/byte, {held_out['bits_per_char']:.3f} bits/char "
                     f"(unigram baseline {held_out['unigram_bits_per_byte']:.3f} bits/byte)")
    for name, scores in report.get("texts", {}).items():
        lines.append(f"{name}: loss {scores['loss']:.4f}, perplexity {scores['perplexity']:.2f}, {scores['bits_per_byte']:.4f} bits/byte")
    for name, result in report.get("tasks", {}).items():
        key, value = headline_metric(result)
        if key:
            lines.append(f"{name}: {key} {value:.4f} ({result.get('metrics', {}).get('count', '?')} items)")
    if (report.get("builtin_task") or {}).get("skipped"):
        lines.append(report["builtin_task"]["skipped"])
    return lines


def headline_metric(result: dict) -> list:
    """(name, value) of the number a task is usually quoted by."""
    metrics = result.get("metrics", result)
    for key in ("mc2", "acc_norm", "acc", "rougeL", "f1", "accuracy"):
        if isinstance(metrics.get(key), (int, float)):
            return [key, metrics[key]]
    return [None, None]


def plot_validation_loss(run_dir: Path, history: list[dict], out_path: Path) -> Path | None:
    """Validation loss against tokens seen: training's periodic validations and the evaluations of checkpoints."""
    from lmforge.training.metrics import read_jsonl_records, save_figure

    metrics_path = run_dir / "logs" / "metrics.jsonl"
    records = read_jsonl_records(metrics_path) if metrics_path.exists() else []
    during = [(r["tokens_seen"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float)) and "tokens_seen" in r]
    evaluated = [(h["tokens_seen"], h["loss"]) for h in history if isinstance(h.get("loss"), (int, float)) and h.get("tokens_seen") is not None]
    if not during and not evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if during:
        axes.plot(*zip(*during), label="validation during training (first eval_batches, disjoint windows)", marker=".", linewidth=1)
    if evaluated:
        axes.plot(*zip(*evaluated), label="lmforge eval (sliding windows)", marker="o", linestyle="none")
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("validation loss (nats/token)")
    axes.set_title(f"{run_dir.name}: validation loss vs tokens")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, out_path)


def _samples(model, tokenizer, config: EvalConfig) -> list[dict]:
    from lmforge.evaluation.task_metrics import fit_prompt

    window = model.config.context_length
    samples = []
    for index, prompt in enumerate(config.prompts):
        params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                                seed=config.seed + index)
        # A prompt longer than the window keeps its end, leaving room for the sample.
        fitted = fit_prompt(tokenizer, prompt, max(window - 1 - config.max_new_tokens, window // 2))
        samples.append({"prompt": prompt, "completion": "".join(generate(model, tokenizer, fitted, params))})
    return samples


def _interval(scores: dict, key: str, digits: int = 4) -> str:
    interval = scores.get("interval", {}).get(key)
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "n/a"


def render_markdown(report: dict, run_dir: Path) -> str:
    lines = [f"# Evaluation of `{run_dir.name}`", "", f"Checkpoint `{report['checkpoint']}` (step {report['step']:,}, "
             f"{report['tokens_seen']:,} tokens seen, {report['parameters']:,} parameters).", ""]
    held_out = report.get("held_out")
    if held_out:
        level = f"{held_out.get('confidence', 0.95):.0%}"
        lines += ["## Held-out split", "",
                  f"Sliding windows of {held_out['stride']} new tokens; {level} intervals from a bootstrap over "
                  f"{held_out['documents']:,} documents ({held_out.get('bootstrap_samples', 0):,} resamples).", "",
                  f"| metric | value | {level} interval |", "| --- | --- | --- |",
                  f"| loss (nats/token) | {held_out['loss']:.4f} | {_interval(held_out, 'loss')} |",
                  f"| perplexity | {held_out['perplexity']:.2f} | {_interval(held_out, 'perplexity', 2)} |",
                  f"| bits per byte | {held_out['bits_per_byte']:.4f} | {_interval(held_out, 'bits_per_byte')} |",
                  f"| bits per character | {held_out['bits_per_char']:.4f} | {_interval(held_out, 'bits_per_char')} |",
                  f"| unigram baseline bits per byte | {held_out['unigram_bits_per_byte']:.4f} | |",
                  f"| tokens scored | {held_out['tokens']:,} ({held_out['fraction_scored']:.0%} of the split) | |", ""]
    if report.get("texts"):
        lines += ["## Texts", "", "| file | loss | perplexity | bits per byte | bits/byte interval | bits per char | tokens | units |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, scores in report["texts"].items():
            lines.append(f"| {name} | {scores['loss']:.4f} | {scores['perplexity']:.2f} | {scores['bits_per_byte']:.4f} | "
                         f"{_interval(scores, 'bits_per_byte')} | {scores.get('bits_per_char', float('nan')):.4f} | {scores['tokens']:,} | "
                         f"{scores.get('documents', 1)} {scores.get('bootstrap_unit', 'document')}s |")
        lines.append("")
    if report.get("tasks") or report.get("builtin_task"):
        lines += render_tasks(report.get("tasks", {}), report.get("builtin_task"), report["step"])
    history = report.get("history", [])
    if len(history) > 1 or (history and held_out is None):
        lines += ["## Over checkpoints", "", "| step | tokens seen | loss | bits per byte | interval | tasks |", "| --- | --- | --- | --- | --- | --- |"]
        for entry in history:
            interval = entry.get("bits_per_byte_interval")
            tasks = ", ".join(f"{name} {key} {value:.3f}" for name, (key, value) in entry.get("tasks", {}).items() if key)
            lines.append(f"| {entry['step']:,} | {entry.get('tokens_seen') or 0:,} | {_number(entry.get('loss'))} | "
                         f"{_number(entry.get('bits_per_byte'))} | {f'[{interval[0]:.4f}, {interval[1]:.4f}]' if interval else 'n/a'} | {tasks} |")
        lines.append("")
    if report.get("samples"):
        lines += ["## Samples", ""]
        for sample in report["samples"]:
            lines += [f"**{sample['prompt']}**", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    plots = []
    if report.get("plots", {}).get("val_loss_vs_tokens"):
        plots.append(f"![validation loss vs tokens]({report['plots']['val_loss_vs_tokens']})")
    if (run_dir / "logs" / "training.png").exists():
        plots.append("![training curves](../logs/training.png)")
    elif (run_dir / "logs" / "loss_curve.png").exists():
        plots.append("![loss curve](../logs/loss_curve.png)")
    if plots:
        lines += ["## Curves", "", *[f"{plot}\n" for plot in plots]]
    return "\n".join(lines)


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def render_tasks(tasks: dict, builtin: dict | None = None, report_step: int | None = None) -> list[str]:
    lines = ["## Tasks", ""]
    if builtin and builtin.get("skipped"):
        lines += [f"The {builtin['skipped']}.", ""]
    for name, result in tasks.items():
        metrics = result.get("metrics", {})
        shots = f", {result['num_fewshot']}-shot" if result.get("num_fewshot") else ""
        step = f" Scored at step {result['step']:,}." if result.get("step") not in (None, report_step) else ""
        lines += [f"### {name}", "", f"`{result['format']}` from `{result['path']}`{shots}, {metrics.get('count', '?')} items.{step}", ""]
        if name == BUILTIN_TASK and builtin and not builtin.get("skipped"):
            splits = ", ".join(f"{count} from the {split} split" for split, count in builtin.get("items_by_split", {}).items())
            lines += [f"Four-way cloze questions made from this run's documents ({splits}); chance is 25%."
                      + (f" Note: {builtin['note']}." if builtin.get("note") else ""), ""]
        lines += ["| metric | value |", "| --- | --- |"]
        for key, value in _flat_numbers(metrics):
            if key == "count" or key.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{key}_stderr")
            lines.append(f"| {key} | {value:.4f}{f' ± {stderr:.4f}' if isinstance(stderr, (int, float)) else ''} |")
        lines.append("")
        if metrics.get("confusion_matrix"):
            labels = metrics["labels"]
            lines += ["Confusion matrix (rows: true label, columns: predicted):", "",
                      "| | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
            lines += [f"| **{label}** | " + " | ".join(str(count) for count in row) + " |" for label, row in zip(labels, metrics["confusion_matrix"])]
            lines.append("")
    return lines


def _flat_numbers(metrics: dict) -> list[tuple[str, float]]:
    """Top-level numbers, and one level of nested ones as ``macro_f1``; per-class tables are left to the JSON."""
    flat = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            flat.append((key, value))
        elif isinstance(value, dict) and key in ("macro", "micro"):
            flat += [(f"{key}_{inner}", number) for inner, number in value.items() if isinstance(number, (int, float))]
    return flat
