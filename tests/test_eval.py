import json
import math
import shutil
import subprocess
import sys

import numpy as np
import torch

from lmforge.config import EvalConfig
from lmforge.evaluation.intrinsic import unigram_bits_per_byte
from lmforge.evaluation.report import evaluate_run, load_for_inference
from lmforge.tokenizer.shards import load_tokens, read_token_meta


def reference_nats(model, ids: np.ndarray, bos_id: int) -> tuple[float, int]:
    """Independent reference: disjoint windows of the context's length, log-softmax by hand.

    The last, partial window is read with a full context before it (as lm-eval's rolling windows do).
    """
    context = model.config.context_length
    nats, count = 0.0, 0
    with torch.no_grad():
        for first_target in range(1, len(ids), context):
            end = min(first_target + context, len(ids))
            start = max(0, end - 1 - context)
            window = torch.tensor(np.asarray(ids[start:end], dtype=np.int64))
            log_probs = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
            for position in range(first_target, end):
                target = int(ids[position])
                if target != bos_id:
                    nats -= float(log_probs[position - start - 1, target])
                    count += 1
    return nats, count


def test_report_scores_equal_an_independent_computation(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model, _, _ = load_for_inference(run, device="cpu")
    context = model.config.context_length
    # With the stride equal to the context, sliding windows are the disjoint windows of the reference.
    config = EvalConfig(max_batches=None, prompts=["The"], max_new_tokens=5, stride=context, builtin_task=False)
    report = evaluate_run(run, config, progress=False, device="cpu")
    for key in ("val_loss", "val_perplexity", "val_bits_per_byte", "val_bits_per_char", "tokens_seen", "parameters", "samples"):
        assert key in report
    meta = read_token_meta(run / "tokens")
    nats, count = reference_nats(model, load_tokens(run / "tokens", "val"), meta["bos_id"])
    held_out = report["held_out"]
    assert held_out["tokens"] == count and held_out["stride"] == context
    assert held_out["bytes"] == meta["splits"]["val"]["bytes"] and held_out["chars"] == meta["splits"]["val"]["characters"]
    assert math.isclose(report["val_loss"], nats / count, rel_tol=1e-5)
    # exp() turns the loss's absolute error (~1e-5 relative x 5 nats) into perplexity's relative error.
    assert math.isclose(report["val_perplexity"], math.exp(nats / count), rel_tol=1e-4)
    assert math.isclose(report["val_bits_per_byte"], nats / math.log(2) / meta["splits"]["val"]["bytes"], rel_tol=1e-5)
    assert math.isclose(report["val_bits_per_char"], nats / math.log(2) / meta["splits"]["val"]["characters"], rel_tol=1e-5)
    low, high = held_out["interval"]["bits_per_byte"]
    assert low < report["val_bits_per_byte"] < high and held_out["documents"] == meta["splits"]["val"]["documents"]
    markdown = (run / "eval" / "report.md").read_text()
    assert "Held-out split" in markdown and "bits per character" in markdown and "95% interval" in markdown


def test_text_file_scores_are_added_to_the_report(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    text = "Return a string containing a printable representation of an object. ✓\n" * 20
    notes = tmp_path / "notes.txt"
    notes.write_text(text, encoding="utf-8")
    context = str(load_for_inference(run, device="cpu")[0].config.context_length)
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--text", str(notes), "--quiet", "--stride", context],
                            capture_output=True, text=True, check=True)
    assert "notes.txt: loss" in result.stdout
    report = json.loads((run / "eval" / "report.json").read_text())
    assert "val_loss" in report  # the earlier held-out scores are kept
    scores = report["texts"]["notes.txt"]
    model, tokenizer, _ = load_for_inference(run, device="cpu")
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id])
    nats, count = reference_nats(model, ids, tokenizer.bos_id)
    assert scores["tokens"] == count == len(ids) - 1
    # `lmforge eval` autocasts to bf16 on a CPU that is fast at it; the reference is fp32.
    assert math.isclose(scores["bits_per_byte"], nats / math.log(2) / len(text.encode()), rel_tol=1e-4)
    assert math.isclose(scores["bits_per_char"], nats / math.log(2) / len(text), rel_tol=1e-4)



def test_unigram_baseline_by_hand():
    train = np.array([0, 3, 3, 4, 1, 0, 3, 1])  # bos=0, eos=1
    val = np.array([0, 3, 4, 1])
    # train counts per id 0..4 are 2, 2, 0, 3, 1; add one to each, then drop BOS (never a target): 0, 3, 1, 4, 2 of 10
    probabilities = np.array([0, 3, 1, 4, 2]) / 10
    expected_bits = -(np.log2(probabilities[3]) + np.log2(probabilities[4]) + np.log2(probabilities[1]))
    assert math.isclose(unigram_bits_per_byte(train, val, 5, 0, val_bytes=4), expected_bits / 4)


def test_eval_of_a_missing_text_file_is_a_clear_error(trained_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(trained_run), "--text", str(tmp_path / "nope.txt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "text file not found" in result.stderr and "Traceback" not in result.stderr


def test_task_files_from_the_command_line_go_into_the_report(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    generation = tmp_path / "qa.jsonl"
    generation.write_text('{"prompt": "The json module", "reference": "encodes JSON"}\n'
                          '{"prompt": "Return the", "references": ["value", "result"]}\n', encoding="utf-8")
    prompted = tmp_path / "sentiment.jsonl"
    prompted.write_text('{"text": "I love this module", "label": "positive"}\n{"text": "This is broken", "label": "negative"}\n',
                        encoding="utf-8")
    head = tmp_path / "head.jsonl"  # a classifier's own answers: 2 of 3 right, "b" never predicted
    head.write_text('{"label": "a", "prediction": "a"}\n{"label": "b", "prediction": "a"}\n{"label": "a", "prediction": "a"}\n',
                    encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--quiet", "--task", f"generation={generation}",
                             "--task", f"classification={prompted}", "--task", f"classification={head}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    tasks = report["tasks"]
    assert "val_loss" in report and "held_out" in report  # the full evaluation's numbers stay
    generated = tasks["generation:qa.jsonl"]
    assert set(generated["metrics"]) >= {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "f1"}
    assert generated["metrics"]["count"] == 2 and len(generated["examples"]) == 2
    assert tasks["classification:sentiment.jsonl"]["metrics"]["count"] == 2
    given = tasks["classification:head.jsonl"]["metrics"]
    assert given["accuracy"] == 2 / 3 and given["confusion_matrix"] == [[2, 0], [1, 0]] and given["per_class"]["b"]["precision"] == 0
    items = [json.loads(line) for line in (run / "eval" / "tasks" / "classification_head.jsonl").read_text().splitlines()]
    assert [row["prediction"] for row in items] == ["a", "a", "a"]
    markdown = (run / "eval" / "report.md").read_text()
    assert "### generation:qa.jsonl" in markdown and "| macro_f1 |" in markdown and "Confusion matrix" in markdown
    assert "classification:head.jsonl: accuracy 0.6667" in result.stdout


def write_data_folder(folder, texts):
    """A data stage folder as the data stage leaves it: gzipped JSONL shards and a manifest."""
    import gzip

    from lmforge.artifacts import write_manifest

    folder.mkdir(parents=True)
    with gzip.open(folder / "val-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc{index}", "text": text, "source": "test", "chars": len(text)}) + "\n")
    write_manifest(folder, "data", {"documents": len(texts)}, {}, {})


RUSSIAN = ("Модуль позволяет читать и записывать данные в простом текстовом формате, который легко понять человеку и "
           "удобно обрабатывать программе, если соблюдать несколько правил оформления строк и полей в каждой записи файла")


def test_the_builtin_task_works_beyond_english_and_steps_aside_when_it_cannot(trained_run, tmp_path):
    from lmforge.evaluation.report import _builtin_task

    _, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    config = EvalConfig(builtin_task_items=20)
    russian = tmp_path / "ru"
    write_data_folder(russian / "data", [" ".join(RUSSIAN.split()[i:] + RUSSIAN.split()[:i]) for i in range(8)])
    tasks, info = _builtin_task(russian, config, tokenizer, context_length=4096)
    assert tasks and info["items"] > 0 and info["items_by_split"]["val"] == info["items"] + info["dropped_as_too_long"]
    # Cached: the same settings reuse the questions, other settings rebuild them.
    assert _builtin_task(russian, config, tokenizer, context_length=4096)[1] == info
    assert _builtin_task(russian, EvalConfig(builtin_task_items=5), tokenizer, context_length=4096)[1]["items"] <= 5

    tiny = tmp_path / "tiny"
    write_data_folder(tiny / "data", ["Only two documents here, far too few for four choices.", "The second one."])
    tasks, info = _builtin_task(tiny, config, tokenizer, context_length=4096)
    assert tasks == [] and info["skipped"].startswith("built-in task skipped")


def test_task_paths_in_a_recipe_are_relative_to_the_recipe(tmp_path, monkeypatch):
    from lmforge.config import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.yaml").write_text("eval:\n  tasks:\n    - {format: arc, path: data/arc.jsonl, fewshot_path: data/dev.jsonl}\n"
                                      "    - {format: mc, path: /abs/mc.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    first, second = load_recipe(folder / "mine.yaml").eval.tasks
    assert first.path == folder / "data" / "arc.jsonl" and first.fewshot_path == folder / "data" / "dev.jsonl"
    assert str(second.path) == "/abs/mc.jsonl"
