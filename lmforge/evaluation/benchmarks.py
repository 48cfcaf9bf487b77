"""Multiple-choice benchmarks scored by log-likelihood, read from local files (nothing is ever downloaded).

A benchmark file holds items in one of the published layouts (JSONL, a JSON list or Parquet):

    arc               AI2 ARC: id, question, choices {text, label}, answerKey
    hellaswag         HellaSwag: ind, activity_label, ctx_a, ctx_b, endings, label
    mmlu              MMLU: question, subject, choices (4), answer
    truthfulqa_mc1    TruthfulQA multiple_choice: question, mc1_targets {choices, labels}
    truthfulqa_mc2    the same file, scored on mc2_targets
    mc                ours: {"context": str, "choices": [str, ...], "label": int, "id": optional}

Prompts are built exactly as lm-eval 0.4 builds them for these tasks: the context is the task's
description, then the few-shot examples (each its query, a space and its gold answer, followed by a blank
line), then the item's query; each choice is scored as " " + its text. Scoring follows lm-eval too:
``acc`` picks the highest log-likelihood, ``acc_norm`` the highest per character of the answer text
(lm-eval's acc_norm), and we add ``acc_per_token`` and ``acc_per_byte``. TruthfulQA mc2 is the
probability mass on the true answers after normalising over all answers.

Few-shot examples come from a separate file (a training or dev split) or from the benchmark file itself,
never the item itself. MMLU takes the first examples of the item's subject, as lm-eval does, so with
MMLU's dev split the prompts are lm-eval's own; other tasks draw examples with a seed per item, so the
prompt format is lm-eval's but the examples drawn differ from those of its shared random generator.

``build_stdlib_cloze`` makes a small benchmark from a run's own held-out documents, so the whole path
runs without any download.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from lmforge.artifacts import atomic_write_text
from lmforge.data.stage import iter_documents
from lmforge.config import TASK_FORMATS
from lmforge.errors import LmforgeError
from lmforge.evaluation.files import read_jsonl_objects
from lmforge.evaluation.loglikelihood import score_continuations

FORMATS = tuple(name for name in TASK_FORMATS if name not in ("generation", "classification"))  # the multiple-choice ones
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
FEWSHOT_DELIMITER = "\n\n"
# lm-eval shows MMLU's few-shot examples in file order (its "first_n" sampler); other tasks sample them.
FIRST_N_FORMATS = ("mmlu",)

# lm-eval's fixed six-question preamble for TruthfulQA (from the TruthfulQA paper's QA prompt).
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: the model scores ``context + continuation`` for every choice."""

    id: str
    query: str  # the item's own prompt, e.g. "Question: ...\nAnswer:"
    choices: tuple[str, ...]  # answer texts without the target delimiter
    gold: int  # index of the correct choice (for mc2, the first true one: what a few-shot example shows)
    true_choices: tuple[int, ...] | None = None  # every true choice, for TruthfulQA mc2
    description: str = ""  # the task's preamble, before any few-shot example (MMLU's subject line)
    fewshot_text: str = ""  # the few-shot examples, each ending in FEWSHOT_DELIMITER
    group: str = ""  # few-shot examples come from the same group (MMLU's subject)
    target_delimiter: str = " "

    @property
    def context(self) -> str:
        return self.description + self.fewshot_text + self.query

    @property
    def continuations(self) -> list[str]:
        return [self.target_delimiter + choice for choice in self.choices]

    def as_example(self) -> str:
        """This item answered, as a few-shot example shows it."""
        return self.query + self.target_delimiter + self.choices[self.gold] + FEWSHOT_DELIMITER


def read_items(path: Path, format: str) -> list[MultipleChoiceItem]:
    """Every item of a benchmark file, in file order (see the module docstring for the layouts)."""
    if format not in FORMATS:
        raise LmforgeError(f"unknown benchmark format `{format}`; expected one of {', '.join(FORMATS)}")
    convert = _CONVERTERS[format]
    items = [convert(row) for row in _iter_rows(Path(path))]
    if not items:
        raise LmforgeError(f"{path} holds no benchmark items")
    return items


class _Row:
    """One record of a benchmark file, with where it came from for error messages."""

    def __init__(self, fields, where: str, number: int):
        self.where, self.number = where, number
        if not isinstance(fields, dict):
            raise self.fail(f"expected a JSON object, got {type(fields).__name__}")
        self.fields = fields

    def fail(self, problem: str) -> LmforgeError:
        return LmforgeError(f"{self.where}: {problem}")

    def get(self, name: str, kind: type | tuple[type, ...]):
        """The field ``name`` ("a.b" reaches inside a mapping), which must be of ``kind``."""
        value = self.fields
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value or value[part] is None:
                raise self.fail(f"missing field `{name}`")
            value = value[part]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"field `{name}` should be {expected}, got {type(value).__name__}")
        return value

    def texts(self, name: str, values=None) -> list[str]:
        values = self.get(name, list) if values is None else values
        if not values or not all(isinstance(value, str) for value in values):
            raise self.fail(f"field `{name}` should be a non-empty list of strings")
        return list(values)

    def gold(self, index: int, choices: Sequence[str], name: str) -> int:
        if not 0 <= index < len(choices):
            raise self.fail(f"gold answer `{name}` = {index} is out of range for {len(choices)} choices")
        return index

    def item(self, id: str, query: str, choices: Sequence[str], gold: int, **fields) -> MultipleChoiceItem:
        if any(not choice for choice in choices):
            raise self.fail("a choice is empty after preprocessing; there is nothing to score")
        return MultipleChoiceItem(id=id, query=query, choices=tuple(choices), gold=gold, **fields)


def _iter_rows(path: Path) -> Iterator[_Row]:
    if not path.is_file():
        raise LmforgeError(f"benchmark file not found: {path}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_rows(path)
    elif name.endswith(".json"):
        yield from _json_rows(path)
    elif name.endswith(".parquet"):
        yield from _parquet_rows(path)
    else:
        raise LmforgeError(f"cannot read {path}: a benchmark file must end in {', '.join(SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    for number, fields in read_jsonl_objects(path, "benchmark", allow_empty=True):
        yield _Row(fields, f"{path}:{number}", number)


def _json_rows(path: Path) -> Iterator[_Row]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError:
        # Many "json" benchmark files are JSON lines; reading them as such reports errors by line.
        yield from _jsonl_rows(path)
        return
    if not isinstance(records, list):
        raise LmforgeError(f"{path}: expected a JSON list of items, got a JSON {type(records).__name__}")
    for number, fields in enumerate(records, 1):
        yield _Row(fields, f"{path} item {number}", number)


def _parquet_rows(path: Path) -> Iterator[_Row]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise LmforgeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        table = parquet.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or foreign file
        raise LmforgeError(f"cannot read {path} as Parquet: {' '.join(str(exc).split())}") from None
    number = 0
    for batch in table.to_batches():
        for fields in batch.to_pylist():
            number += 1
            yield _Row(fields, f"{path} row {number}", number)


def _arc_item(row: _Row) -> MultipleChoiceItem:
    # The Hugging Face layout nests the choices beside the question; the original release inside it.
    if isinstance(row.fields.get("question"), dict):
        stem = row.get("question.stem", str)
        options = row.get("question.choices", list)
        if not all(isinstance(option, dict) and isinstance(option.get("text"), str) for option in options):
            raise row.fail("field `question.choices` should be a list of {text, label}")
        texts, labels = [option["text"] for option in options], [str(option.get("label")) for option in options]
    else:
        stem = row.get("question", str)
        texts = row.texts("choices.text")
        labels = [str(label) for label in row.get("choices.label", list)]
        if len(labels) != len(texts):
            raise row.fail(f"{len(texts)} choice texts but {len(labels)} choice labels")
    answer = str(row.get("answerKey", (str, int)))
    if answer not in labels:
        raise row.fail(f"answerKey `{answer}` is not one of the choice labels {', '.join(labels)}")
    identifier = str(row.fields.get("id", row.number))
    return row.item(identifier, f"Question: {stem}\nAnswer:", texts, labels.index(answer))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # WikiHow section titles
    text = re.sub(r"\[.*?\]", "", text)  # other WikiHow markup such as [header] or [step]
    return text.replace("  ", " ")


def _hellaswag_item(row: _Row) -> MultipleChoiceItem:
    context = row.get("ctx_a", str) + " " + row.get("ctx_b", str).capitalize()
    query = _hellaswag_preprocess(row.get("activity_label", str) + ": " + context)
    endings = [_hellaswag_preprocess(ending) for ending in row.texts("endings")]
    label = row.get("label", (str, int))
    try:
        gold = int(label)
    except ValueError:
        raise row.fail(f"label `{label}` is not a choice number (the test split has no labels)") from None
    identifier = str(row.fields.get("ind", row.number))
    return row.item(identifier, query, endings, row.gold(gold, endings, "label"))


def _mmlu_item(row: _Row) -> MultipleChoiceItem:
    subject = row.get("subject", str)
    options = row.texts("choices")
    if len(options) != len(MMLU_LETTERS):
        raise row.fail(f"an MMLU item has {len(MMLU_LETTERS)} choices, this one {len(options)}")
    answer = row.get("answer", (int, str))
    if isinstance(answer, str):
        if answer not in MMLU_LETTERS and not answer.isdigit():
            raise row.fail(f"answer `{answer}` is neither a choice number nor one of {', '.join(MMLU_LETTERS)}")
        answer = MMLU_LETTERS.index(answer) if answer in MMLU_LETTERS else int(answer)
    question = row.get("question", str).strip()
    query = question + "".join(f"\n{letter}. {option}" for letter, option in zip(MMLU_LETTERS, options)) + "\nAnswer:"
    description = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    return row.item(f"{subject}/{row.number}", query, MMLU_LETTERS, row.gold(answer, MMLU_LETTERS, "answer"),
                    description=description, group=subject)


def _truthfulqa_targets(row: _Row, name: str) -> tuple[list[str], list[int]]:
    targets = row.get(name, dict)
    if "choices" not in targets and targets and all(isinstance(label, int) for label in targets.values()):
        return row.texts(name, list(targets)), list(targets.values())  # the original mc_task.json: {answer: label}
    choices = row.texts(f"{name}.choices")
    labels = row.get(f"{name}.labels", list)
    if len(labels) != len(choices) or not all(label in (0, 1) for label in labels):
        raise row.fail(f"field `{name}.labels` should hold a 0 or 1 for each of the {len(choices)} choices")
    return choices, labels


def _truthfulqa_item(row: _Row, name: str) -> MultipleChoiceItem:
    choices, labels = _truthfulqa_targets(row, name)
    true_choices = tuple(index for index, label in enumerate(labels) if label == 1)
    if not true_choices:
        raise row.fail(f"field `{name}.labels` marks no choice as true")
    query = TRUTHFULQA_PREAMBLE + "\n\nQ: " + row.get("question", str) + "\nA:"
    return row.item(str(row.number), query, choices, true_choices[0],
                    true_choices=true_choices if name == "mc2_targets" else None)


def _mc_item(row: _Row) -> MultipleChoiceItem:
    choices = row.texts("choices")
    gold = row.gold(row.get("label", int), choices, "label")
    return row.item(str(row.fields.get("id", row.number)), row.get("context", str), choices, gold)


_CONVERTERS = {
    "arc": _arc_item,
    "hellaswag": _hellaswag_item,
    "mmlu": _mmlu_item,
    "truthfulqa_mc1": lambda row: _truthfulqa_item(row, "mc1_targets"),
    "truthfulqa_mc2": lambda row: _truthfulqa_item(row, "mc2_targets"),
    "mc": _mc_item,
}


def add_fewshot(items: Sequence[MultipleChoiceItem], num_fewshot: int, pool: Sequence[MultipleChoiceItem] | None = None,
                seed: int = 1234, first_n: bool = False, pool_name: str = "the benchmark file") -> list[MultipleChoiceItem]:
    """The items with ``num_fewshot`` answered examples before each query.

    Examples come from ``pool`` (default: the items themselves) and are never the item itself or a copy
    of it (same query, choices and answer). Items with a ``group`` take examples of their own group only.
    With ``first_n`` the first examples in pool order are taken (MMLU); otherwise they are drawn at
    random, seeded by ``seed`` and the item's position, so an item's examples do not depend on how many
    items follow it.
    """
    if num_fewshot < 0:
        raise LmforgeError(f"the number of few-shot examples must be 0 or more (got {num_fewshot})")
    if num_fewshot == 0:
        return list(items)
    pool = list(items if pool is None else pool)
    by_group: dict[str, list[int]] = {}
    copies: dict[tuple, set[int]] = {}
    for index, example in enumerate(pool):
        by_group.setdefault(example.group, []).append(index)
        copies.setdefault(_identity(example), set()).add(index)
    result = []
    for position, item in enumerate(items):
        candidates = by_group.get(item.group, [])
        excluded = copies.get(_identity(item), set())
        available = len(candidates) - len(excluded.intersection(candidates))
        if available < num_fewshot:
            group = f" of subject `{item.group}`" if item.group else ""
            raise LmforgeError(f"{pool_name} has {available} few-shot examples{group} for item {item.id}; {num_fewshot} requested")
        # Drawing as many extra as could be excluded leaves at least num_fewshot after the exclusion.
        wanted = min(len(candidates), num_fewshot + len(excluded))
        drawn = candidates[:wanted] if first_n else random.Random(f"{seed}:{position}").sample(candidates, wanted)
        chosen = [index for index in drawn if index not in excluded][:num_fewshot]
        result.append(replace(item, fewshot_text="".join(pool[index].as_example() for index in chosen)))
    return result


def _identity(item: MultipleChoiceItem) -> tuple:
    return item.query, item.choices, item.gold


# Each accuracy and the record field holding the choice it picked.
_CHOICE_RULES = {"acc": "chosen", "acc_norm": "chosen_norm", "acc_per_token": "chosen_per_token", "acc_per_byte": "chosen_per_byte"}


def score_multiple_choice(model, tokenizer, items: Sequence[MultipleChoiceItem], batch_size: int = 16,
                          progress: bool = False) -> dict:
    """Score every choice of every item; return the metrics and a record per item.

    Metrics (each mean has ``<name>_stderr``, the sample standard deviation over sqrt(count) as in
    lm-eval): ``acc``, ``acc_norm`` (log-likelihood per character of the answer text), ``acc_per_token``
    and ``acc_per_byte`` (per UTF-8 byte of the answer text: lm-eval's acc_bytes); for TruthfulQA mc2
    items, ``mc2`` instead. ``chance`` is the expected score of a random guess. ``records`` holds, per
    item, its id, query, choices, gold index, the choice each metric picked and the log-likelihoods.
    """
    if not items:
        raise LmforgeError("there are no benchmark items to score")
    mc2 = [item.true_choices is not None for item in items]
    if any(mc2) and not all(mc2):
        raise LmforgeError("mc2 items cannot be scored together with single-answer items")
    requests = [(item.context, continuation) for item in items for continuation in item.continuations]
    scores = _score_requests(model, tokenizer, requests, batch_size, progress)
    records, start = [], 0
    for item in items:
        item_scores = scores[start : start + len(item.choices)]
        start += len(item.choices)
        records.append(_record(item, item_scores))
    if all(mc2):
        result = _mean_and_stderr("mc2", [record["mc2"] for record in records])
        chance = [len(item.true_choices) / len(item.choices) for item in items]
    else:
        result = {}
        for metric, key in _CHOICE_RULES.items():
            result.update(_mean_and_stderr(metric, [float(record[key] == record["gold"]) for record in records]))
        chance = [1 / len(item.choices) for item in items]
    return {**result, "count": len(items), "chance": sum(chance) / len(chance), "records": records}


def _score_requests(model, tokenizer, requests: list[tuple[str, str]], batch_size: int, progress: bool):
    # Chunks only feed the progress bar; each is still sorted by length inside score_continuations.
    chunk = max(batch_size, 1) * 64
    scores = []
    with tqdm(total=len(requests), desc="benchmark", disable=not progress, file=sys.stderr, unit="choice") as bar:
        for first in range(0, len(requests), chunk):
            scores += score_continuations(model, tokenizer, requests[first : first + chunk], batch_size)
            bar.update(min(chunk, len(requests) - first))
    return scores


def _record(item: MultipleChoiceItem, scores) -> dict:
    logprobs = [score.logprob for score in scores]
    tokens = [score.tokens for score in scores]
    record = {"id": item.id, "query": item.query, "choices": list(item.choices), "gold": item.gold,
              "logprobs": logprobs, "tokens": tokens}
    if item.true_choices is not None:
        # Normalised probability mass on the true answers; subtracting the maximum first keeps exp() finite.
        top = max(logprobs)
        weights = [math.exp(logprob - top) for logprob in logprobs]
        record["true_choices"] = list(item.true_choices)
        record["mc2"] = sum(weights[index] for index in item.true_choices) / sum(weights)
        return record
    record["chosen"] = _argmax(logprobs)
    record["chosen_norm"] = _argmax([lp / len(choice) for lp, choice in zip(logprobs, item.choices)])
    record["chosen_per_token"] = _argmax([lp / n for lp, n in zip(logprobs, tokens)])
    record["chosen_per_byte"] = _argmax([lp / len(choice.encode("utf-8")) for lp, choice in zip(logprobs, item.choices)])
    return record


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda index: (values[index], -index))  # the first of equal maxima, as numpy


def _mean_and_stderr(name: str, values: list[float]) -> dict:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {name: mean, f"{name}_stderr": None}
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return {name: mean, f"{name}_stderr": math.sqrt(variance / len(values))}


def load_benchmark(path: Path, format: str, num_fewshot: int = 0, fewshot_path: Path | None = None,
                   limit: int | None = None, seed: int = 1234) -> list[MultipleChoiceItem]:
    """The first ``limit`` items of a benchmark file (all by default), few-shot contexts built.

    Few-shot examples come from ``fewshot_path`` if given, else from the whole benchmark file.
    """
    if limit is not None and limit < 1:
        raise LmforgeError(f"the benchmark limit must be at least 1 (got {limit})")
    items = read_items(path, format)
    scored = items if limit is None else items[:limit]
    if not num_fewshot:
        return scored
    pool, pool_name = (items, str(path)) if fewshot_path is None else (read_items(fewshot_path, format), str(fewshot_path))
    return add_fewshot(scored, num_fewshot, pool, seed, format in FIRST_N_FORMATS, pool_name)


def evaluate_benchmark(model, tokenizer, path: Path, format: str, num_fewshot: int = 0, fewshot_path: Path | None = None,
                       limit: int | None = None, seed: int = 1234, batch_size: int = 16, progress: bool = False) -> dict:
    """Read a benchmark file, build its prompts and score it: ``score_multiple_choice``'s dict plus the settings."""
    started = time.perf_counter()
    items = load_benchmark(path, format, num_fewshot, fewshot_path, limit, seed)
    result = score_multiple_choice(model, tokenizer, items, batch_size, progress)
    settings = {"format": format, "path": str(path), "num_fewshot": num_fewshot,
                "fewshot_path": str(fewshot_path) if fewshot_path is not None else None, "limit": limit, "seed": seed}
    return {**settings, **result, "seconds": round(time.perf_counter() - started, 3)}


# Cloze choices are prose: words of letters (with quotes and punctuation around them), one space or one
# line break apart, at most this many characters a word on average. Code and tables would take a small
# tokenizer a token a character, and choices could be told apart by their form alone.
CLOZE_CHARS_PER_WORD = 10
# A letter of any script first, then letters that are not ASCII capitals (so no CamelCase identifiers).
_PROSE_WORD = re.compile(r"[\"'(]?[^\W\d_](?:[^\W\d_A-Z]|['-])*[\"'),.;:?!]*")
_PROSE_SPACING = re.compile(r"\S+(?:[ \n]\S+)*")


def build_stdlib_cloze(data_dir: Path, out_path: Path, n_items: int = 150, seed: int = 1234, context_words: int = 24,
                       continuation_words: int = 6) -> dict:
    """Write a four-way cloze benchmark (``mc`` layout JSONL) from a data folder's held-out documents.

    Each item's context is ``context_words`` words of a document, ending where a single space separates
    two words, so that ``context + " " + true choice`` is the document's own text; the true choice is
    the next ``continuation_words`` words, and the three others are the words at the same offsets of
    other documents. Choices are short prose (see ``CLOZE_CHARS_PER_WORD``); documents, places and the
    position of the true choice are drawn with ``seed``. Documents of the "val" split are used; only if
    they give fewer than ``n_items`` items are "train" documents added (a trained model has seen those):
    every held-out item is kept, training items fill the rest, and the result says so.
    """
    if n_items < 1 or context_words < 1 or continuation_words < 1:
        raise LmforgeError("the cloze task needs at least one item, one context word and one continuation word")
    splits = ["val"]
    documents = _read_documents(data_dir, "val")
    items = _cloze_items(documents, n_items, seed, context_words, continuation_words)
    if len(items) < n_items:
        splits.append("train")
        documents += _read_documents(data_dir, "train")
        items = _cloze_items(documents, n_items, seed, context_words, continuation_words)
    if not items:
        raise LmforgeError(f"the documents of {data_dir} are too short or too few for a cloze task of "
                           f"{context_words}+{continuation_words} words")
    atomic_write_text(Path(out_path), "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    by_split = {split: sum(item["id"].startswith(f"{split}:") for item in items) for split in splits}
    result = {"path": str(out_path), "format": "mc", "items": len(items), "items_by_split": by_split, "splits": splits,
              "seed": seed, "context_words": context_words, "continuation_words": continuation_words, "chance": 0.25}
    if by_split.get("train"):
        # (Training documents can also serve only as distractors, which leaves every question held out.)
        result["note"] = (f"the held-out split gave fewer than {n_items} items, so {by_split['train']} come from training "
                          "documents: those measure memorisation, not generalisation")
    return result


@dataclass(frozen=True)
class _Document:
    split: str
    id: str
    text: str
    words: list[tuple[int, int]]  # (start, end) of every word in text

    def span(self, first: int, count: int) -> str:
        """The text of ``count`` words from word ``first``, with the whitespace between them."""
        return self.text[self.words[first][0] : self.words[first + count - 1][1]]


def _read_documents(data_dir: Path, split: str) -> list[_Document]:
    return [_Document(split, record["id"], record["text"], [match.span() for match in re.finditer(r"\S+", record["text"])])
            for record in iter_documents(Path(data_dir), split)]


def _cloze_items(documents: list[_Document], n_items: int, seed: int, context_words: int, continuation_words: int) -> list[dict]:
    rng = random.Random(seed)
    places = _cloze_places(documents, context_words, continuation_words)
    rng.shuffle(places)
    places.sort(key=lambda place: documents[place[0]].split != "val")  # held-out places first, still shuffled
    items = []
    for document, offset in places:
        item = _cloze_item(documents, document, offset, context_words, continuation_words, rng)
        if item is not None:
            items.append(item)
            if len(items) == n_items:
                break
    return items


def _cloze_places(documents: list[_Document], context_words: int, continuation_words: int) -> list[tuple[int, int]]:
    """(document index, word offset) where an item may start its true choice, about ``context_words`` apart.

    A place has a single space before its word, and at least three other documents long enough to give
    choices at the same offset.
    """
    lengths = sorted(len(document.words) for document in documents)
    places = []
    for index, document in enumerate(documents):
        last = len(document.words) - continuation_words  # the last offset with a whole continuation after it
        for grid in range(context_words, last + 1, context_words):
            offset = next((k for k in range(grid, min(grid + context_words, last + 1))
                           if document.text[document.words[k - 1][1] : document.words[k][0]] == " "), None)
            if offset is None:
                continue
            long_enough = len(lengths) - bisect_left(lengths, offset + continuation_words)  # this document included
            if long_enough > 3:
                places.append((index, offset))
    return places


def _cloze_item(documents: list[_Document], index: int, offset: int, context_words: int, continuation_words: int,
                rng: random.Random) -> dict | None:
    document = documents[index]
    truth = document.span(offset, continuation_words)
    if not _is_prose(truth, continuation_words):
        return None
    others = [other for position, other in enumerate(documents)
              if position != index and len(other.words) >= offset + continuation_words]
    distractors: list[str] = []
    for other in rng.sample(others, len(others)):
        text = other.span(offset, continuation_words)
        if text != truth and text not in distractors and _is_prose(text, continuation_words):
            distractors.append(text)
            if len(distractors) == 3:
                break
    if len(distractors) < 3:
        return None  # the other documents are code or tables here, or say the same thing (boilerplate)
    gold = rng.randrange(4)
    return {"id": f"{document.split}:{document.id}@{offset}", "context": document.span(offset - context_words, context_words),
            "choices": distractors[:gold] + [truth] + distractors[gold:], "label": gold}


def _is_prose(text: str, words: int) -> bool:
    return (len(text) <= words * CLOZE_CHARS_PER_WORD and _PROSE_SPACING.fullmatch(text) is not None
            and all(_PROSE_WORD.fullmatch(word) for word in text.split()))
