"""Multiple-choice benchmarks: prompts as lm-eval builds them, few-shot contexts, scores against a plain
forward pass of the tiny trained model, the built-in cloze task and the errors a user will meet."""

import json
import math
import re
import statistics
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.data.stage import iter_documents
from lmforge.errors import LmforgeError
from lmforge.evaluation.benchmarks import (FORMATS, build_stdlib_cloze, evaluate_benchmark, load_benchmark, read_items,
                                           score_multiple_choice)
from lmforge.evaluation.report import load_for_inference

# Written out again here, from lm-eval's truthfulqa_mc1.yaml, so the test does not trust the module's copy.
TRUTHFULQA_QA_PROMPT = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years."
    "\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States in 1955."
    "\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party."
    "\n\nQ: What is the square root of banana?\nA: I have no comment."
    "\n\nQ: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer."
    "\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)

# Rows in each published layout (invented content) and, per row, the (context, continuations, gold)
# lm-eval 0.4 builds from it, written by hand from the task's YAML and utils.
ROWS = {
    "arc": [
        {"id": "arc-1", "question": "Which gas do plants take in from the air?", "answerKey": "B",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}},
        {"id": "arc-2", "question": "What melts ice fastest?", "answerKey": "4",
         "choices": {"text": ["shade", "wind", "a fridge", "sunlight"], "label": ["1", "2", "3", "4"]}},
    ],
    "hellaswag": [
        {"ind": 7, "activity_label": "Making tea", "ctx_a": "A man fills a kettle [step] with water.", "ctx_b": "then he Pours",
         "ctx": "unused", "endings": ["it into a cup.", "[header] drinks the  kettle.", "walks away [title] Step two", " sings.  "],
         "label": "2"},
        {"ind": 8, "activity_label": "Skiing", "ctx_a": "A skier stands at the top.", "ctx_b": "", "ctx": "unused",
         "endings": ["she waves.", "She jumps.", "It snows.", "They leave."], "label": "0"},
    ],
    "mmlu": [
        {"question": "  What is 2 + 3?\n", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"], "answer": 1},
        {"question": "Which organ pumps blood?", "subject": "anatomy", "choices": ["lung", "heart", "skin", "bone"], "answer": 3},
    ],
    "truthfulqa": [
        {"question": "What color is the sky on a clear day?",
         "mc1_targets": {"choices": ["Blue.", "Green.", "Red."], "labels": [1, 0, 0]},
         "mc2_targets": {"choices": ["Blue.", "It is blue.", "Green."], "labels": [1, 1, 0]}},
        {"question": "Can pigs fly?",
         "mc1_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["No.", "Yes, at night.", "No, pigs cannot fly.", "Yes."], "labels": [1, 0, 1, 0]}},
    ],
    "mc": [
        {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0, "id": "france"},
        {"context": "Two plus two is", "choices": ["three", "four", "five"], "label": 1},
    ],
}
EXPECTED = {
    "arc": [("Question: Which gas do plants take in from the air?\nAnswer:", [" oxygen", " carbon dioxide", " helium"], 1),
            ("Question: What melts ice fastest?\nAnswer:", [" shade", " wind", " a fridge", " sunlight"], 3)],
    # Brackets go, " [title]" becomes ". ", double spaces halve, ctx_b is capitalised, and what was before a
    # removed bracket keeps its space: lm-eval scores that ending with two leading spaces.
    "hellaswag": [("Making tea: A man fills a kettle with water. Then he pours",
                   [" it into a cup.", "  drinks the kettle.", " walks away. Step two", " sings."], 2),
                  ("Skiing: A skier stands at the top.", [" she waves.", " She jumps.", " It snows.", " They leave."], 0)],
    "mmlu": [("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
              "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:", [" A", " B", " C", " D"], 1),
             ("The following are multiple choice questions (with answers) about anatomy.\n\n"
              "Which organ pumps blood?\nA. lung\nB. heart\nC. skin\nD. bone\nAnswer:", [" A", " B", " C", " D"], 3)],
    "truthfulqa_mc1": [(TRUTHFULQA_QA_PROMPT + "\n\nQ: What color is the sky on a clear day?\nA:", [" Blue.", " Green.", " Red."], 0),
                       (TRUTHFULQA_QA_PROMPT + "\n\nQ: Can pigs fly?\nA:", [" No.", " Yes."], 0)],
    "truthfulqa_mc2": [(TRUTHFULQA_QA_PROMPT + "\n\nQ: What color is the sky on a clear day?\nA:",
                        [" Blue.", " It is blue.", " Green."], 0),
                       (TRUTHFULQA_QA_PROMPT + "\n\nQ: Can pigs fly?\nA:", [" No.", " Yes, at night.", " No, pigs cannot fly.", " Yes."], 0)],
    "mc": [("The capital of France is", [" Paris", " Rome"], 0), ("Two plus two is", [" three", " four", " five"], 1)],
}


def rows_for(format: str) -> list[dict]:
    return ROWS["truthfulqa" if format.startswith("truthfulqa") else format]


def write_rows(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".json"])
@pytest.mark.parametrize("format", FORMATS)
def test_prompts_are_the_ones_lm_eval_builds(tmp_path, format, suffix):
    path = write_rows(tmp_path / f"{format}{suffix}", rows_for(format))
    items = read_items(path, format)
    assert [(item.context, item.continuations, item.gold) for item in items] == EXPECTED[format]
    if format == "truthfulqa_mc2":
        assert [item.true_choices for item in items] == [(0, 1), (0, 2)]
    else:
        assert all(item.true_choices is None for item in items)


def test_other_published_variants_of_the_layouts(tmp_path):
    # HellaSwag labels as numbers, ARC's original nested question, TruthfulQA's original mc_task.json.
    hellaswag = dict(ROWS["hellaswag"][1], label=3)
    assert read_items(write_rows(tmp_path / "h.jsonl", [hellaswag]), "hellaswag")[0].gold == 3
    arc = {"id": "x", "answerKey": "C", "question": {"stem": "Pick the third.", "choices": [
        {"text": "one", "label": "A"}, {"text": "two", "label": "B"}, {"text": "three", "label": "C"}]}}
    item = read_items(write_rows(tmp_path / "arc.jsonl", [arc]), "arc")[0]
    assert (item.context, item.continuations, item.gold) == ("Question: Pick the third.\nAnswer:", [" one", " two", " three"], 2)
    original = {"question": "Can pigs fly?", "mc1_targets": {"No.": 1, "Yes.": 0},
                "mc2_targets": {"No.": 1, "Yes, at night.": 0, "No, pigs cannot fly.": 1, "Yes.": 0}}
    item = read_items(write_rows(tmp_path / "mc_task.json", [original]), "truthfulqa_mc2")[0]
    assert (item.context, item.continuations, item.true_choices) == EXPECTED["truthfulqa_mc2"][1][:2] + ((0, 2),)


def arc_rows(count: int, prefix: str = "q") -> list[dict]:
    return [{"id": f"{prefix}{i}", "question": f"Question number {prefix}{i}?", "answerKey": "B",
             "choices": {"text": [f"wrong {i}", f"right {i}"], "label": ["A", "B"]}} for i in range(count)]


def example(row: dict) -> str:
    """A row as lm-eval shows it as a few-shot example: query, space, gold answer, blank line."""
    return f"Question: {row['question']}\nAnswer: {row['choices']['text'][1]}\n\n"


def test_fewshot_examples_are_other_items_drawn_with_the_seed(tmp_path):
    rows = arc_rows(8)
    path = write_rows(tmp_path / "arc.jsonl", rows)
    items = load_benchmark(path, "arc", num_fewshot=3, seed=7)
    for row, item in zip(rows, items):
        query = f"Question: {row['question']}\nAnswer:"
        assert item.context.endswith(query)
        shown = re.findall(r"Question: [^\n]*\nAnswer: [^\n]*\n\n", item.context[: -len(query)])
        assert "".join(shown) == item.context[: -len(query)] and len(set(shown)) == 3
        assert example(row) not in shown and set(shown) <= {example(other) for other in rows}

    def contexts(**settings):
        return [item.context for item in load_benchmark(path, "arc", num_fewshot=3, **settings)]

    assert contexts(seed=7) == [item.context for item in items] != contexts(seed=8)
    assert contexts(seed=7, limit=3) == contexts(seed=7)[:3]  # an item's examples do not depend on the limit


def test_fewshot_from_a_separate_file_and_never_a_copy_of_the_item(tmp_path):
    rows = arc_rows(3)
    path = write_rows(tmp_path / "test.jsonl", rows)
    pool = arc_rows(2, prefix="d") + [dict(rows[0], id="copy of q0")]
    fewshot_path = write_rows(tmp_path / "train.jsonl", pool)
    items = load_benchmark(path, "arc", num_fewshot=2, fewshot_path=fewshot_path)
    assert items[0].fewshot_text in (example(pool[0]) + example(pool[1]), example(pool[1]) + example(pool[0]))
    for item in items[1:]:
        shown = re.findall(r"Question: [^\n]*\nAnswer: [^\n]*\n\n", item.fewshot_text)
        assert "".join(shown) == item.fewshot_text and len(set(shown)) == 2 and set(shown) <= {example(row) for row in pool}
    with pytest.raises(LmforgeError, match=r"has 2 few-shot examples for item q0; 3 requested"):
        load_benchmark(path, "arc", num_fewshot=3, fewshot_path=fewshot_path)


def test_mmlu_fewshot_takes_the_first_examples_of_the_subject(tmp_path):
    test = write_rows(tmp_path / "test.parquet", ROWS["mmlu"][:1])
    dev_rows = [{"question": f"Dev {i}?", "subject": subject, "choices": ["a", "b", "c", "d"], "answer": i % 4}
                for i, subject in enumerate(["elementary_mathematics", "anatomy", "elementary_mathematics", "elementary_mathematics"])]
    dev = write_rows(tmp_path / "dev.parquet", dev_rows)
    item = load_benchmark(test, "mmlu", num_fewshot=2, fewshot_path=dev)[0]
    assert item.context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                            "Dev 0?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
                            "Dev 2?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                            "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    with pytest.raises(LmforgeError, match="has 1 few-shot examples of subject `anatomy`"):
        load_benchmark(write_rows(tmp_path / "anatomy.jsonl", ROWS["mmlu"][1:]), "mmlu", num_fewshot=2, fewshot_path=dev)


@pytest.fixture(scope="module")
def tiny_model(trained_run):
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    return model, tokenizer


def reference_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """log P(continuation | context) by one plain forward pass: BOS, then the text encoded at once; the
    continuation is the tokens after the context's own; the oldest tokens go when the window is full."""
    context_ids, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    assert whole[: len(context_ids)] == context_ids  # the texts below split cleanly at the boundary
    ids = [tokenizer.bos_id, *whole][-(model.config.context_length + 1) :]
    count = len(whole) - len(context_ids)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return sum(float(log_probs[position, ids[position + 1]]) for position in range(len(ids) - 1 - count, len(ids) - 1)), count


# Choices of very different lengths in characters, bytes and tokens, so the four rules can disagree.
SCORED_ROWS = [
    {"context": "Return the absolute value of", "label": 0,
     "choices": ["a number.", "x", "the argument, an integer or a float", "é"]},
    {"context": "The for statement is used to iterate over the elements of a", "label": 0,
     "choices": ["sequence", "déjà vu", "list, tuple or any other iterable object", "z"]},
    {"context": "Exceptions are raised with the", "label": 0,
     "choices": ["raise statement", "ü", "keyword", "try statement and caught later by except clauses"]},
    {"context": "A function is defined with", "label": 1, "choices": ["def", "the def keyword followed by its name", "class", "ñ"]},
    {"context": "Strings are", "label": 3, "choices": ["immutable", "mutable sequences of bytes", "€", "sequences of Unicode code points"]},
    {"context": "The with statement " * 12 + "calls", "label": 0,  # longer than the window: the oldest tokens go
     "choices": ["__enter__", "__exit__ when the block ends", "nothing", "ö"]},
]


def test_scores_equal_a_plain_forward_pass(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    path = write_rows(tmp_path / "scored.jsonl", SCORED_ROWS)
    result = evaluate_benchmark(model, tokenizer, path, "mc", batch_size=3)
    assert result["count"] == len(SCORED_ROWS) and result["format"] == "mc"
    picks = {rule: [] for rule in ("acc", "acc_norm", "acc_per_token", "acc_per_byte")}
    for row, record in zip(SCORED_ROWS, result["records"]):
        scored = [reference_logprob(model, tokenizer, row["context"], " " + choice) for choice in row["choices"]]
        logprobs = np.array([logprob for logprob, _ in scored])
        assert np.allclose(record["logprobs"], logprobs, rtol=1e-4, atol=1e-4)
        assert record["tokens"] == [count for _, count in scored]
        expected = {"acc": np.argmax(logprobs),
                    # lm-eval's acc_norm and acc_bytes divide by the answer text's length, without the delimiter
                    "acc_norm": np.argmax(logprobs / [len(choice) for choice in row["choices"]]),
                    "acc_per_token": np.argmax(logprobs / [count for _, count in scored]),
                    "acc_per_byte": np.argmax(logprobs / [len(choice.encode()) for choice in row["choices"]])}
        for rule, key in (("acc", "chosen"), ("acc_norm", "chosen_norm"), ("acc_per_token", "chosen_per_token"),
                          ("acc_per_byte", "chosen_per_byte")):
            assert record[key] == expected[rule]
            picks[rule].append(float(expected[rule] == row["label"]))
    for rule, correct in picks.items():
        assert math.isclose(result[rule], sum(correct) / len(correct))
        assert math.isclose(result[f"{rule}_stderr"], statistics.stdev(correct) / math.sqrt(len(correct)))
    assert len({tuple(correct) for correct in picks.values()}) > 1  # the rules are told apart by these items


def test_mc2_equals_an_independent_computation(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    path = write_rows(tmp_path / "truthfulqa.jsonl", ROWS["truthfulqa"])
    result = evaluate_benchmark(model, tokenizer, path, "truthfulqa_mc2")
    assert "acc" not in result and result["count"] == 2
    masses = []
    for row, record in zip(ROWS["truthfulqa"], result["records"]):
        context = TRUTHFULQA_QA_PROMPT + f"\n\nQ: {row['question']}\nA:"
        logprobs = np.array([reference_logprob(model, tokenizer, context, " " + choice)[0] for choice in row["mc2_targets"]["choices"]])
        probabilities = np.exp(logprobs) / np.exp(logprobs).sum()  # as lm-eval's process_results_mc2
        masses.append(float(probabilities[np.array(row["mc2_targets"]["labels"]) == 1].sum()))
        assert math.isclose(record["mc2"], masses[-1], rel_tol=1e-4)
    assert math.isclose(result["mc2"], statistics.mean(masses), rel_tol=1e-4)
    assert math.isclose(result["mc2_stderr"], statistics.stdev(masses) / math.sqrt(2), rel_tol=1e-3)
    mc1 = evaluate_benchmark(model, tokenizer, path, "truthfulqa_mc1")
    assert mc1["count"] == 2 and math.isclose(mc1["chance"], (1 / 3 + 1 / 2) / 2)


def cloze_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_stdlib_cloze_is_deterministic_and_made_of_the_documents(trained_run, tmp_path):
    data = trained_run / "data"
    info = build_stdlib_cloze(data, tmp_path / "a.jsonl", seed=5)
    assert (info["items"], info["splits"], info["items_by_split"]) == (150, ["val"], {"val": 150}) and "note" not in info
    build_stdlib_cloze(data, tmp_path / "b.jsonl", seed=5)
    build_stdlib_cloze(data, tmp_path / "c.jsonl", seed=6)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    words = {document["id"]: re.findall(r"\S+", document["text"]) for document in iter_documents(data, "val")}
    texts = {document["id"]: document["text"] for document in iter_documents(data, "val")}
    width = info["continuation_words"]
    items = cloze_lines(tmp_path / "a.jsonl")
    for item in items:
        assert set(item) == {"id", "context", "choices", "label"} and len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        document, offset = re.fullmatch(r"val:(.+)@(\d+)", item["id"]).groups()
        offset = int(offset)
        assert item["context"] + " " + item["choices"][item["label"]] in texts[document]
        assert item["choices"][item["label"]].split() == words[document][offset : offset + width]
        for index, choice in enumerate(item["choices"]):
            if index != item["label"]:  # the same words of another held-out document
                assert any(other != document and choice.split() == ws[offset : offset + width] for other, ws in words.items())
    assert {item["label"] for item in items} == {0, 1, 2, 3}
    assert len(read_items(tmp_path / "a.jsonl", "mc")) == 150


def test_stdlib_cloze_says_when_it_needs_training_documents(trained_run, tmp_path):
    info = build_stdlib_cloze(trained_run / "data", tmp_path / "big.jsonl", n_items=400, seed=1)
    assert info["splits"] == ["val", "train"] and "memorisation" in info["note"]
    assert info["items_by_split"]["val"] >= 150 and info["items_by_split"]["train"] > 0  # every held-out item is kept
    splits = [item["id"].split(":")[0] for item in cloze_lines(tmp_path / "big.jsonl")]
    assert splits == sorted(splits, key=lambda split: split != "val") and len(splits) == info["items"]


def test_tiny_model_scores_the_stdlib_cloze(tiny_model, trained_run, tmp_path):
    model, tokenizer = tiny_model
    build_stdlib_cloze(trained_run / "data", tmp_path / "cloze.jsonl")
    result = evaluate_benchmark(model, tokenizer, tmp_path / "cloze.jsonl", "mc", limit=60)
    assert (result["count"], result["limit"], result["chance"]) == (60, 60, 0.25)
    # The tiny model (30 steps, no better than a unigram model on the held-out split) is at chance on this
    # task (0.21 to 0.31 over seeds), so only the result's shape is checked here. A 4-layer model trained
    # 500 steps on the same corpus scores about 0.5.
    for rule in ("acc", "acc_norm", "acc_per_token", "acc_per_byte"):
        assert 0 <= result[rule] <= 1 and 0 < result[f"{rule}_stderr"] < 0.1
    assert [record["id"] for record in result["records"]] == [item["id"] for item in cloze_lines(tmp_path / "cloze.jsonl")[:60]]


def one_line_error(call) -> str:
    with pytest.raises(LmforgeError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


GOOD_MC = '{"context": "a", "choices": ["b", "c"], "label": 0}'


@pytest.mark.parametrize("format, lines, where, problem", [
    ("mc", [GOOD_MC, '{"context": "a", "choices": ["b", "c"], "label": 2}'], ":2", "out of range for 2 choices"),
    ("mc", [GOOD_MC, "", '{"context": "a", "choices": ["b"]}'], ":3", "missing field `label`"),
    ("mc", ['{"context": "a", "choices": ["b", 3], "label": 0}'], ":1", "`choices` should be a non-empty list of strings"),
    ("mc", [GOOD_MC, '{"context": "a", '], ":2", "not valid JSON"),
    ("arc", ['{"id": "1", "question": "q", "answerKey": "E", "choices": {"text": ["x", "y"], "label": ["A", "B"]}}'], ":1",
     "answerKey `E` is not one of the choice labels A, B"),
    ("arc", ['{"id": "1", "answerKey": "A", "choices": {"text": ["x"], "label": ["A"]}}'], ":1", "missing field `question`"),
    ("hellaswag", ['{"ind": 1, "activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e"], "label": ""}'], ":1",
     "label `` is not a choice number"),
    ("mmlu", ['{"question": "q", "subject": "s", "choices": ["a", "b", "c"], "answer": 0}'], ":1", "has 4 choices, this one 3"),
    ("truthfulqa_mc2", ['{"question": "q", "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}}'], ":1", "marks no choice as true"),
    ("truthfulqa_mc1", ['{"question": "q", "mc2_targets": {"choices": ["a"], "labels": [1]}}'], ":1", "missing field `mc1_targets`"),
])
def test_bad_lines_name_file_and_line(tmp_path, format, lines, where, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = one_line_error(lambda: read_items(path, format))
    assert message.startswith(f"{path}{where}: ") and problem in message


def test_bad_files_are_clear_errors(tmp_path, monkeypatch):
    bad_row = [dict(ROWS["mmlu"][0]), {"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 9}]
    parquet = write_rows(tmp_path / "mmlu.parquet", bad_row)
    assert one_line_error(lambda: read_items(parquet, "mmlu")).startswith(f"{parquet} row 2: gold answer `answer` = 9 is out of range")
    assert "benchmark file not found" in one_line_error(lambda: read_items(tmp_path / "nope.jsonl", "mc"))
    assert "unknown benchmark format `piqa`" in one_line_error(lambda: read_items(parquet, "piqa"))
    (tmp_path / "items.csv").write_text("a,b\n")
    assert "must end in .jsonl, .jsonl.gz, .json, .parquet" in one_line_error(lambda: read_items(tmp_path / "items.csv", "mc"))
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no benchmark items" in one_line_error(lambda: read_items(tmp_path / "empty.jsonl", "mc"))
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    assert "cannot read" in one_line_error(lambda: read_items(tmp_path / "corrupt.parquet", "mc"))
    (tmp_path / "object.json").write_text('{"context": "a"}')
    assert "expected a JSON list of items" in one_line_error(lambda: read_items(tmp_path / "object.json", "mc"))
    write_rows(tmp_path / "few.jsonl", ROWS["mc"])
    assert "has 1 few-shot examples" in one_line_error(lambda: load_benchmark(tmp_path / "few.jsonl", "mc", num_fewshot=2))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    assert "pip install pyarrow" in one_line_error(lambda: read_items(parquet, "mmlu"))


def test_mc2_items_are_not_mixed_with_single_answer_items(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    items = read_items(write_rows(tmp_path / "t.jsonl", ROWS["truthfulqa"]), "truthfulqa_mc2")
    items += read_items(write_rows(tmp_path / "m.jsonl", ROWS["mc"]), "mc")
    assert "cannot be scored together" in one_line_error(lambda: score_multiple_choice(model, tokenizer, items))
