"""Sliding-window scoring, bits per byte/character and the document-level bootstrap, against references computed here."""

import gzip
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmforge.evaluation.intrinsic import DocumentScores, score_document_texts, score_text_paragraphs
from lmforge.evaluation.loglikelihood import count_windows, sliding_windows, token_logprobs
from lmforge.evaluation.report import load_for_inference
from lmforge.errors import LmforgeError

TEXT = ("The json module encodes and decodes JSON documents.\n\n"
        "Return a string containing a printable representation of an object; naïve café ✓.\n\n\n"
        "The pathlib module offers classes representing filesystem paths with semantics for different systems.\n")


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    return model, tokenizer


def full_context_logprobs(model, ids: list[int]) -> list[float]:
    """Each token given every earlier token the window allows (the last context_length), one forward pass per token."""
    context = model.config.context_length
    out = []
    with torch.no_grad():
        for position in range(1, len(ids)):
            prefix = torch.tensor([ids[max(0, position - context) : position]])
            out.append(float(torch.log_softmax(model(prefix)[0, -1].double(), dim=-1)[ids[position]]))
    return out


def test_windows_score_every_token_once_with_enough_context():
    for n_tokens in range(0, 40):
        for context in (1, 4, 8):
            for stride in range(1, context + 1):
                windows = list(sliding_windows(n_tokens, context, stride))
                assert len(windows) == count_windows(n_tokens, context, stride)
                scored = [p for start, end, first in windows for p in range(first, end)]
                assert scored == list(range(1, n_tokens))  # every target once, in order
                for start, end, first in windows:
                    assert end - 1 - start <= context  # inputs fit the model
                    if first > 1:  # after the first window, each token sees at least context - stride tokens
                        assert first - start >= context - stride
    with pytest.raises(LmforgeError, match="stride"):
        list(sliding_windows(10, 4, 5))


def test_stride_one_equals_a_full_context_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXT * 2)]
    assert len(ids) > 2 * model.config.context_length
    reference = full_context_logprobs(model, ids)
    ours = token_logprobs(model, ids, stride=1, batch_size=7)
    assert np.allclose(ours.numpy(), reference, atol=1e-4)


def test_each_stride_gives_each_token_the_context_its_window_holds(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXT * 2)]
    context, n = model.config.context_length, len(ids)
    for stride in (context, context // 2, 5):
        # Window k starts at k * stride (the last one ends at the last token) and scores the tokens no earlier window did.
        reference = []
        with torch.no_grad():
            for position in range(1, n):
                k = 0 if position <= context else -(-(position - context) // stride)
                start = min(k * stride, n - 1 - context) if k else 0
                prefix = torch.tensor([ids[start:position]])
                reference.append(float(torch.log_softmax(model(prefix)[0, -1].double(), dim=-1)[ids[position]]))
        assert np.allclose(token_logprobs(model, ids, stride=stride, batch_size=3).numpy(), reference, atol=1e-4), stride


def test_windows_line_endings_split_paragraphs_too(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    crlf = TEXT.replace("\n", "\r\n")
    assert len(score_text_paragraphs(model, tokenizer, crlf).nats) == 3
    assert len(score_text_paragraphs(model, tokenizer, "One paragraph.\n \t\nAnother one.").nats) == 2  # a blank line may hold spaces


def test_paragraphs_split_the_score_of_one_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    scores = score_text_paragraphs(model, tokenizer, TEXT, stride=5)
    assert len(scores.nats) == 3  # the blank-line runs separate three paragraphs
    ids = [tokenizer.bos_id, *tokenizer.encode(TEXT), tokenizer.eos_id]
    total = -token_logprobs(model, ids, stride=5).sum().item()
    summary = scores.summary(bootstrap_samples=200)
    assert math.isclose(summary["loss"], total / (len(ids) - 1), rel_tol=1e-9)
    assert summary["bytes"] == len(TEXT.encode()) and summary["chars"] == len(TEXT)
    assert math.isclose(summary["bits_per_char"], total / math.log(2) / len(TEXT), rel_tol=1e-9)
    # Paragraph byte counts add up to the paragraphs' own bytes (the separators go with the paragraph before them).
    first_paragraph = TEXT[: TEXT.index("Return")]
    assert scores.bytes[0] == len(first_paragraph.encode())


def test_documents_are_separate_units_laid_out_as_in_training(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = ["The json module.", "Return the café.", "A third document here."]
    scores = score_document_texts(model, tokenizer, texts, stride=model.config.context_length)
    assert list(scores.tokens) == [len(tokenizer.encode(t)) + 1 for t in texts]  # text and EOS; the next BOS is not scored
    assert list(scores.bytes) == [len(t.encode()) for t in texts] and list(scores.chars) == [len(t) for t in texts]


def test_bootstrap_interval_matches_the_delta_method():
    rng = np.random.default_rng(1)
    n = 400
    tokens = rng.integers(50, 500, n).astype(float)
    nats = tokens * rng.normal(3.0, 0.4, n)
    scores = DocumentScores(nats=nats, tokens=tokens, bytes=tokens * 4, chars=tokens * 4, stride=64)
    summary = scores.summary(bootstrap_samples=2000, seed=3)
    low, high = summary["interval"]["loss"]
    assert low < summary["loss"] < high
    # Standard error of a ratio of sums (delta method): sqrt(sum((nats - r * tokens)^2)) / sum(tokens).
    ratio = nats.sum() / tokens.sum()
    standard_error = math.sqrt(((nats - ratio * tokens) ** 2).sum()) / tokens.sum()
    assert math.isclose((high - low) / 2, 1.96 * standard_error, rel_tol=0.15)
    # Identical documents leave nothing to resample: the interval collapses onto the estimate.
    same = DocumentScores(nats=np.full(10, 30.0), tokens=np.full(10, 10.0), bytes=np.full(10, 40.0), chars=np.full(10, 40.0), stride=8)
    interval = same.summary(bootstrap_samples=100)["interval"]["bits_per_byte"]
    assert math.isclose(interval[0], interval[1]) and math.isclose(interval[0], 30 / math.log(2) / 40)
    # One document has no interval rather than a fake one.
    assert "interval" not in DocumentScores(nats=np.ones(1), tokens=np.ones(1), bytes=np.ones(1), chars=np.ones(1), stride=8).summary()


def test_all_checkpoints_fill_the_table_and_the_plot(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in ["The json module.", "Return the value.", "Paths."]) + "\n")
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--all-checkpoints", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(steps) <= {entry["step"] for entry in report["history"]}
    assert report["step"] == max(steps) and (run / "eval" / "val_loss_vs_tokens.png").stat().st_size > 1000
    markdown = (run / "eval" / "report.md").read_text()
    assert "## Over checkpoints" in markdown and "val_loss_vs_tokens.png" in markdown
    # Adding a JSONL text later keeps the table and scores each line as a document.
    subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--text", str(docs), "--quiet"], check=True, capture_output=True)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["texts"]["docs.jsonl"]["documents"] == 3 and len(report["history"]) >= len(steps)


def test_a_named_checkpoint_is_the_one_evaluated(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    oldest = sorted((run / "checkpoints").glob("step_*"))[0]
    step = int(oldest.name.split("_")[1])
    for args in ([str(oldest)], [str(run), "--checkpoint", oldest.name]):
        (run / "eval" / "report.json").unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", *args, "--quiet"], check=True, capture_output=True)
        report = json.loads((run / "eval" / "report.json").read_text())
        assert report["step"] == step and report["checkpoint"] == str(oldest)
    # Files scored later on another checkpoint say which one; two files of one name keep both, told apart by folder.
    subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--quiet"], check=True, capture_output=True)
    for folder in ("easy", "hard"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.jsonl").write_text(json.dumps({"context": "The json", "choices": ["module", "fish"], "label": 0}) + "\n")
    docs = tmp_path / "docs.jsonl.gz"
    with gzip.open(docs, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "The json module."}) + "\n" + json.dumps({"text": "Return the value."}) + "\n")
    subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--quiet", "--checkpoint", oldest.name, "--text", str(docs),
                    "--task", f"mc={tmp_path / 'easy' / 'test.jsonl'}", "--task", f"mc={tmp_path / 'hard' / 'test.jsonl'}"],
                   check=True, capture_output=True)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["step"] > step and report["tasks"]["mc:easy/test.jsonl"]["step"] == step and "mc:hard/test.jsonl" in report["tasks"]
    assert report["texts"]["docs.jsonl.gz"]["documents"] == 2 and report["texts"]["docs.jsonl.gz"]["step"] == step
    assert f"Scored at step {step}" in (run / "eval" / "report.md").read_text()
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(run), "--checkpoint", "step_404"], capture_output=True, text=True)
    assert result.returncode == 2 and "no checkpoint step_404" in result.stderr


def test_bad_eval_arguments_are_one_line_errors(trained_run, tmp_path):
    def lmforge(*args):
        return subprocess.run([sys.executable, "-m", "lmforge.cli", "eval", str(trained_run), *args], capture_output=True, text=True)

    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    for args, message in [(["--stride", "0"], "--stride must be at least 1"),
                          (["--text", str(empty)], "is empty"),
                          (["--all-checkpoints", "--text", str(empty)], "one checkpoint at a time"),
                          (["--stride", "100000"], "eval.stride is 100000"),
                          (["--task", "arcc=x.jsonl"], "did you mean arc"),
                          (["--task", "arc"], "FORMAT=FILE"),
                          (["--task", f"arc={tmp_path / 'missing.jsonl'}"], "not found")]:
        result = lmforge(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
