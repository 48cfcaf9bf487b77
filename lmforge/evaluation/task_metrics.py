"""Task metrics for ``lmforge eval``: generation against references, and classification.

Generation examples are JSONL lines ``{"prompt": ..., "reference": "..." | [...]}`` or
``{"prompt": ..., "references": [...]}``; each is answered by greedy decoding and scored with corpus BLEU
and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), and SQuAD-style exact match and token F1. All
generation metrics are on a 0-100 scale, like BLEU.

Classification examples are JSONL lines ``{"text": ..., "label": ...}``. Without a classification head a
model classifies by prompting: each label option is scored as the continuation of a template filled with
the text, and the most likely option wins. A classifier with its own head (or any other classifier)
writes its answers as ``{"label": ..., "prediction": ...}`` lines, which are scored as they are.
``classification_metrics`` scores any classifier's labels; its values are fractions in [0, 1], like
scikit-learn's.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import EvalTask
from lmforge.errors import LmforgeError
from lmforge.evaluation.files import read_jsonl_objects, string_field

DEFAULT_TEMPLATE = EvalTask.model_fields["template"].default


@dataclass(frozen=True)
class GenerationExample:
    prompt: str
    references: list[str]  # at least one; a prediction is scored against the closest


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str


def _reference_list(record: dict, where: str) -> list[str]:
    keys = [key for key in ("reference", "references") if key in record]
    if len(keys) != 1:
        raise LmforgeError(f"{where}: needs exactly one of the fields 'reference' or 'references'")
    key = keys[0]
    value = record[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise LmforgeError(f"{where}: field {key!r} must be a string or a list of strings")
    if not value or not all(item.strip() for item in value):
        raise LmforgeError(f"{where}: field {key!r} is empty or holds an empty reference")
    return value


def read_generation_examples(path: Path) -> list[GenerationExample]:
    """Prompts with their references from a JSONL file; any mistake names the file and line."""
    return [GenerationExample(string_field(record, "prompt", f"{path}:{number}"), _reference_list(record, f"{path}:{number}"))
            for number, record in read_jsonl_objects(path, "generation")]


def read_classification_examples(path: Path) -> list[ClassificationExample]:
    """Texts with their labels from a JSONL file; any mistake names the file and line."""
    return [ClassificationExample(string_field(record, "text", f"{path}:{number}"), string_field(record, "label", f"{path}:{number}"))
            for number, record in read_jsonl_objects(path, "classification")]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag of normalised tokens shared by prediction and reference, in [0, 1]."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)  # two empty answers agree; an empty one matches nothing else
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every example's k-th reference.

    An example with fewer references gets ``None`` in the missing streams, which sacrebleu skips. An
    empty string would instead count as a real, empty reference and change the brevity penalty and chrF.
    """
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU and chrF, mean best-reference ROUGE-1/2/L F-measure, exact match and token F1 (0-100).

    ``references[i]`` holds one or more references for ``predictions[i]``; their number may vary.
    ROUGE tokenizes as rouge-score does (lowercase ASCII letters and digits only), so text in other
    scripts scores 0 there; BLEU and chrF have no such limit.
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    predictions, references = list(predictions), [list(refs) for refs in references]
    streams = _reference_streams(references)
    # Stemming credits inflections ("runs" / "running"), as ROUGE-1.5.5 run with -m does for the
    # published summarization numbers these scores get compared with.
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = Counter()
    for prediction, refs in zip(predictions, references):
        for kind, score in scorer.score_multi(refs, prediction).items():  # the best reference per kind
            rouge[kind] += score.fmeasure
    count = len(predictions)
    exact = sum(max(float(normalize_answer(p) == normalize_answer(r)) for r in refs) for p, refs in zip(predictions, references))
    f1 = sum(max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"count": count,
            "bleu": sacrebleu.corpus_bleu(predictions, streams).score,
            "chrf": sacrebleu.corpus_chrf(predictions, streams).score,
            "rouge1": 100 * rouge["rouge1"] / count, "rouge2": 100 * rouge["rouge2"] / count, "rougeL": 100 * rouge["rougeL"] / count,
            "exact_match": 100 * exact / count, "f1": 100 * f1 / count}


def fit_prompt(tokenizer, prompt: str, max_tokens: int) -> str:
    """An end of ``prompt`` (whole characters) that encodes to at most ``max_tokens`` tokens.

    It is the longest such end whenever a longer text never encodes to fewer tokens, as is the rule for
    byte-level BPE; a rare exception can only make it a character or two shorter, never too long.
    """
    if len(tokenizer.encode(prompt)) <= max_tokens:
        return prompt
    # Binary search on the first kept character; prompt[high:] always fits (the empty string does).
    low, high = 0, len(prompt)
    while high - low > 1:
        middle = (low + high) // 2
        if len(tokenizer.encode(prompt[middle:])) <= max_tokens:
            high = middle
        else:
            low = middle
    return prompt[high:]


def evaluate_generation(model, tokenizer, examples: Sequence[GenerationExample], max_new_tokens: int = 64,
                        stop: Sequence[str] = ("\n",), progress: bool = False) -> dict:
    """Answer each prompt by greedy decoding and score the answers against the references.

    A prompt that would leave fewer than ``max_new_tokens`` of the model's context free is cut from the
    left (its end is what the answer continues); such examples are marked ``"truncated": true`` and
    counted in the metrics as ``truncated_prompts``. Predictions are stripped of surrounding whitespace.
    """
    from tqdm import tqdm

    from lmforge.inference.generate import SamplingParams, generate

    context = model.config.context_length
    prompt_budget = context - 1 - max_new_tokens  # BOS takes one position
    if prompt_budget < 1:
        raise LmforgeError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's context of {context} tokens")
    if not examples:
        raise LmforgeError("there are no generation examples to evaluate")
    rows = []
    for example in tqdm(examples, desc="generate", disable=not progress, file=sys.stderr):
        prompt = fit_prompt(tokenizer, example.prompt, prompt_budget)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=list(stop))
        prediction = "".join(generate(model, tokenizer, prompt, params)).strip()
        rows.append({"prompt": example.prompt, "prediction": prediction, "references": list(example.references),
                     "truncated": prompt != example.prompt})
    metrics = generation_metrics([row["prediction"] for row in rows], [row["references"] for row in rows])
    metrics["truncated_prompts"] = sum(row["truncated"] for row in rows)
    return {"metrics": metrics, "examples": rows}


def classification_metrics(true_labels: Sequence[str], predicted_labels: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, per-class and macro/micro precision, recall and F1, and the confusion matrix.

    ``labels`` fixes the order of the classes (labels never seen may be listed); labels that occur but
    are not listed are added after, sorted. A ratio with a zero denominator is 0, like scikit-learn's
    ``zero_division=0``. Macro averages are unweighted means over the classes; macro F1 is the mean of
    per-class F1s. The confusion matrix has one row per true label and one column per predicted label.
    """
    if len(true_labels) != len(predicted_labels):
        raise ValueError(f"{len(true_labels)} true labels but {len(predicted_labels)} predicted labels")
    if not true_labels:
        raise ValueError("no labels to score")
    order = list(dict.fromkeys(labels or []))
    order += sorted((set(true_labels) | set(predicted_labels)) - set(order))
    index = {label: i for i, label in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for true, predicted in zip(true_labels, predicted_labels):
        matrix[index[true]][index[predicted]] += 1

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else 0.0

    per_class, totals = {}, Counter()
    for i, label in enumerate(order):
        true_positives = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision, recall = ratio(true_positives, predicted), ratio(true_positives, support)
        f1 = ratio(2 * precision * recall, precision + recall)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        totals.update(true_positives=true_positives, predicted=predicted, support=support)
    macro = {key: sum(scores[key] for scores in per_class.values()) / len(order) for key in ("precision", "recall", "f1")}
    micro_precision, micro_recall = ratio(totals["true_positives"], totals["predicted"]), ratio(totals["true_positives"], totals["support"])
    micro = {"precision": micro_precision, "recall": micro_recall,
             "f1": ratio(2 * micro_precision * micro_recall, micro_precision + micro_recall)}
    return {"count": len(true_labels), "accuracy": sum(t == p for t, p in zip(true_labels, predicted_labels)) / len(true_labels),
            "labels": order, "per_class": per_class, "macro": macro, "micro": micro, "confusion_matrix": matrix}


def fill_template(template: str, text: str) -> str:
    """``template`` with ``{text}`` replaced; other braces are kept as they are (no str.format)."""
    if "{text}" not in template:
        raise LmforgeError(f"the classification template must contain {{text}} (got {template!r})")
    return template.replace("{text}", text)


def classify_by_prompting(model, tokenizer, texts: Sequence[str], options: Sequence[str], template: str = DEFAULT_TEMPLATE,
                          batch_size: int = 16) -> list[str]:
    """For each text, the option whose continuation ``" " + option`` of the filled template is most likely.

    Options are compared by raw log-likelihood (summed over their tokens, not normalised by length), so
    a longer option needs each of its tokens to be likely; ties go to the option listed first. A text too
    long for the model's context loses its beginning, as ``score_continuations`` documents.
    """
    from lmforge.evaluation.loglikelihood import score_continuations

    options = list(options)
    if len(options) < 2:
        raise LmforgeError(f"classification by prompting needs at least 2 label options (got {options})")
    if len(set(options)) != len(options) or not all(option.strip() for option in options):
        raise LmforgeError(f"label options must be distinct and non-empty (got {options})")
    requests = [(fill_template(template, text), " " + option) for text in texts for option in options]
    scores = score_continuations(model, tokenizer, requests, batch_size)
    predictions = []
    for first in range(0, len(scores), len(options)):
        logprobs = [score.logprob for score in scores[first : first + len(options)]]
        predictions.append(options[logprobs.index(max(logprobs))])
    return predictions


def evaluate_classification(model, tokenizer, examples: Sequence[ClassificationExample], options: Sequence[str] | None = None,
                            template: str = DEFAULT_TEMPLATE, batch_size: int = 16) -> dict:
    """Classify each example by prompting and score the predictions.

    ``options`` default to the sorted set of labels in the examples; every example's label must be one
    of them. Returns ``{"metrics", "options", "template", "examples"}``, each example with its prediction.
    """
    if not examples:
        raise LmforgeError("there are no classification examples to evaluate")
    options = sorted({example.label for example in examples}) if options is None else list(options)
    unknown = sorted({example.label for example in examples} - set(options))
    if unknown:
        raise LmforgeError(f"labels {unknown} occur in the examples but are not among the options {options}")
    predictions = classify_by_prompting(model, tokenizer, [example.text for example in examples], options, template, batch_size)
    true_labels = [example.label for example in examples]
    return {"metrics": classification_metrics(true_labels, predictions, labels=options), "options": options, "template": template,
            "examples": [{"text": e.text, "label": e.label, "prediction": p} for e, p in zip(examples, predictions)]}


def has_predictions(path: Path) -> bool:
    """Whether a classification file carries a classifier's answers (every line has ``prediction``)."""
    return all("prediction" in record for _, record in read_jsonl_objects(path, "classification"))


def evaluate_classification_predictions(path: Path, options: Sequence[str] | None = None, limit: int | None = None) -> dict:
    """Score the ``prediction`` of each ``{"label", "prediction"}`` line (the first ``limit``), e.g. a classification head's output."""
    rows = [{"label": string_field(record, "label", f"{path}:{number}"), "prediction": string_field(record, "prediction", f"{path}:{number}")}
            for number, record in read_jsonl_objects(path, "classification")[:limit]]
    metrics = classification_metrics([row["label"] for row in rows], [row["prediction"] for row in rows], labels=options)
    return {"metrics": metrics, "options": metrics["labels"], "examples": rows}
