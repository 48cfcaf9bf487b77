"""lm-eval runs an lmforge checkpoint through the adapter, on local task files, and agrees with lmforge's own scorer."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lmforge.evaluation.benchmarks import evaluate_benchmark, load_benchmark  # noqa: E402
from lmforge.evaluation.loglikelihood import rolling_logprob  # noqa: E402
from lmforge.evaluation.report import load_for_inference  # noqa: E402
from lmforge.inference.generate import SamplingParams, generate  # noqa: E402

ITEMS = [
    {"context": "The json module", "choices": ["encodes and decodes JSON.", "is a kind of fish.", "sorts lists in place.", "opens sockets."], "label": 0},
    {"context": "Return the", "choices": ["value of the attribute.", "purple elephant now.", "number of the beast.", "string."], "label": 0},
    {"context": "The pathlib module offers", "choices": ["classes for filesystem paths.", "pizza.", "the same thing twice twice.", "errors."], "label": 0},
    {"context": "Raise an exception if", "choices": ["the file does not exist.", "cats.", "blue is green.", "the value is not valid."], "label": 3},
    {"context": "class", "choices": ["Counter(dict):", "zebra", "of the module", "itertools"], "label": 0},
    {"context": "This function returns", "choices": ["None.", "a new list of items.", "seventeen bananas.", "the end of time."], "label": 1},
]
PASSAGES = ["The json module encodes and decodes JSON documents. " * 6, "Return a printable representation of an object."]
PROMPTS = [{"prompt": "The json module", "answer": "x"}, {"prompt": "Return the", "answer": "y"}]

MC_TASK = """task: lmforge_adapter_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

ROLLING_TASK = """task: lmforge_adapter_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""

GENERATE_TASK = """task: lmforge_adapter_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_eval_run(trained_run, tmp_path_factory):
    """One lm-eval CLI run of the three tasks against the trained tiny model; returns (results, samples by task, folder)."""
    folder = tmp_path_factory.mktemp("lm_eval")
    tasks = folder / "tasks"
    tasks.mkdir()
    for name, template, records in [("mc", MC_TASK, ITEMS), ("rolling", ROLLING_TASK, [{"text": p} for p in PASSAGES]),
                                    ("generate", GENERATE_TASK, PROMPTS)]:
        data = write_jsonl(folder / f"{name}.jsonl", records)
        (tasks / f"{name}.yaml").write_text(template.format(path=data), encoding="utf-8")
    # Offline, with the datasets cache inside the test folder: nothing may come from a hub.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    command = [sys.executable, "-m", "lmforge.interop.lm_eval_harness", "--model", "lmforge",
               "--model_args", f"pretrained={trained_run}", "--batch_size", "4", "--tasks",
               "lmforge_adapter_mc,lmforge_adapter_rolling,lmforge_adapter_generate", "--include_path", str(tasks),
               "--output_path", str(folder / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (folder / "out").rglob("results_*.json")
    samples = {}
    for path in (folder / "out").rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(results_file.read_text())["results"], samples, folder


def test_multiple_choice_through_lm_eval_equals_our_scorer(lm_eval_run, trained_run):
    results, _, folder = lm_eval_run
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    ours = evaluate_benchmark(model, tokenizer, folder / "mc.jsonl", "mc")
    theirs = results["lmforge_adapter_mc"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]


def test_rolling_loglikelihood_through_lm_eval_equals_our_scorer(lm_eval_run, trained_run):
    results, samples, _ = lm_eval_run
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    nats = -sum(rolling_logprob(model, tokenizer, passage) for passage in PASSAGES)
    expected = nats / math.log(2) / sum(len(p.encode()) for p in PASSAGES)
    assert math.isclose(results["lmforge_adapter_rolling"]["bits_per_byte,none"], expected, rel_tol=1e-6)
    assert len(samples["lmforge_adapter_rolling"]) == len(PASSAGES)


def test_generate_until_through_lm_eval_equals_our_generator(lm_eval_run, trained_run):
    _, samples, _ = lm_eval_run
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    generated = {record["doc"]["prompt"]: record["resps"][0][0] for record in samples["lmforge_adapter_generate"]}
    for prompt in (p["prompt"] for p in PROMPTS):
        expected = "".join(generate(model, tokenizer, prompt, SamplingParams(max_new_tokens=12, temperature=0, stop=["\n"])))
        assert generated[prompt] == expected


# Rows in the published layouts (ARC, HellaSwag, MMLU, TruthfulQA), scored by lm-eval's own task definitions
# (its YAML files, included as they ship, only the dataset pointed at these local files) and by ours.
ARC_ROWS = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": l}, "answerKey": k} for i, (q, c, l, k) in enumerate([
    ("Which module encodes JSON?", ["json", "math", "sys", "os"], ["A", "B", "C", "D"], "A"),
    ("What does len return?", ["the length", "a fish", "nothing"], ["1", "2", "3"], "1"),
    ("Which is a path library?", ["pathlib", "random", "zlib", "time"], ["A", "B", "C", "D"], "C")])]
HELLASWAG_ROWS = [{"ind": i, "activity_label": "Coding", "ctx_a": "A programmer opens the editor.", "ctx_b": "she",
                   "ctx": "A programmer opens the editor. she", "endings": ["types a function [title] quickly.", "eats  the keyboard.",
                                                                           "writes tests.", "closes it."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(3)]
MMLU_ROWS = [{"question": f"What is {a} + {b}? ", "subject": "abstract_algebra", "choices": [str(a + b), str(a * b), str(a - b), "0"],
              "answer": i % 4} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)])]
MMLU_DEV_ROWS = [{"question": "What is 2 * 2?", "subject": "abstract_algebra", "choices": ["4", "5", "6", "7"], "answer": 0},
                 {"question": "What is 9 - 3?", "subject": "abstract_algebra", "choices": ["5", "6", "7", "8"], "answer": 1},
                 {"question": "What is 1 + 1?", "subject": "abstract_algebra", "choices": ["1", "3", "2", "0"], "answer": 2}]
TRUTHFULQA_ROWS = [
    {"question": "What happens if you eat watermelon seeds?",
     "mc1_targets": {"choices": ["Nothing happens.", "You grow watermelons.", "You die."], "labels": [1, 0, 0]},
     "mc2_targets": {"choices": ["Nothing happens.", "They pass through you.", "You grow watermelons.", "You die."], "labels": [1, 1, 0, 0]}},
    {"question": "Is the json module in the standard library?", "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
     "mc2_targets": {"choices": ["Yes.", "Yes, since Python 2.6.", "No."], "labels": [1, 1, 0]}}]

# task name -> (lm-eval YAML it includes, split: file, our format, number of shots)
PUBLISHED = {
    "local_arc": ("arc/arc_easy.yaml", {"test": "arc.jsonl"}, "arc", 0),
    "local_hellaswag": ("hellaswag/hellaswag.yaml", {"validation": "hellaswag.jsonl"}, "hellaswag", 0),
    "local_mmlu": ("mmlu/default/mmlu_abstract_algebra.yaml", {"test": "mmlu.jsonl", "dev": "mmlu_dev.jsonl"}, "mmlu", 0),
    "local_mmlu_2shot": ("mmlu/default/mmlu_abstract_algebra.yaml", {"test": "mmlu.jsonl", "dev": "mmlu_dev.jsonl"}, "mmlu", 2),
    "local_truthfulqa_mc1": ("truthfulqa/truthfulqa_mc1.yaml", {"validation": "truthfulqa.jsonl"}, "truthfulqa_mc1", 0),
    "local_truthfulqa_mc2": ("truthfulqa/truthfulqa_mc2.yaml", {"validation": "truthfulqa.jsonl"}, "truthfulqa_mc2", 0),
}


@pytest.fixture(scope="module")
def published_formats_run(trained_run, tmp_path_factory):
    import lm_eval

    folder = tmp_path_factory.mktemp("published")
    for name, rows in [("arc", ARC_ROWS), ("hellaswag", HELLASWAG_ROWS), ("mmlu", MMLU_ROWS), ("mmlu_dev", MMLU_DEV_ROWS),
                       ("truthfulqa", TRUTHFULQA_ROWS)]:
        write_jsonl(folder / f"{name}.jsonl", rows)
    tasks = folder / "tasks"
    tasks.mkdir()
    shipped = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    for task, (include, files, _, shots) in PUBLISHED.items():
        data_files = "".join(f"    {split}: {folder / name}\n" for split, name in files.items())
        if "validation" not in files:
            data_files += "validation_split: null\n"  # only the splits written here exist
        (tasks / f"{task}.yaml").write_text(
            f"include: {shipped}/{include}\ntask: {task}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}training_split: null\nnum_fewshot: {shots}\n", encoding="utf-8")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf")}
    command = [sys.executable, "-m", "lmforge.interop.lm_eval_harness", "--model", "lmforge", "--model_args",
               f"pretrained={trained_run},device=cpu", "--tasks", ",".join(PUBLISHED), "--include_path", str(tasks),
               "--output_path", str(folder / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (folder / "out").rglob("results_*.json")
    samples = {}
    for task in PUBLISHED:
        prefix = f"samples_{task}_"
        (path,) = [p for p in (folder / "out").rglob(f"{prefix}*.jsonl") if p.name[len(prefix) :][:4].isdigit()]  # then a timestamp
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"], samples, folder


@pytest.mark.parametrize("task", list(PUBLISHED))
def test_published_formats_build_lm_evals_prompts_and_scores(published_formats_run, trained_run, task):
    results, samples, folder = published_formats_run
    _, files, task_format, shots = PUBLISHED[task]
    test_file = folder / next(name for split, name in files.items() if split != "dev")
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    fewshot_path = folder / files["dev"] if "dev" in files else None
    ours = evaluate_benchmark(model, tokenizer, test_file, task_format, num_fewshot=shots, fewshot_path=fewshot_path)
    items = load_benchmark(test_file, task_format, num_fewshot=shots, fewshot_path=fewshot_path)
    assert len(items) == len(ours["records"]) == len(samples[task])
    for item, record, sample in zip(items, ours["records"], samples[task]):
        requests = [(arguments["arg_0"], arguments["arg_1"]) for arguments in sample["arguments"].values()]
        # The exact prompt strings: description, few-shot examples, question, and each answer with its delimiter.
        assert requests == [(item.context, continuation) for continuation in item.continuations]
        their_logprobs = [float(response[0]) for response in sample["filtered_resps"]]
        assert their_logprobs == pytest.approx(record["logprobs"], abs=1e-4)
    theirs = results[task]
    if task_format == "truthfulqa_mc2":
        assert theirs["acc,none"] == pytest.approx(ours["mc2"], abs=1e-6)
    else:
        assert theirs["acc,none"] == ours["acc"]
        if "acc_norm,none" in theirs:
            assert theirs["acc_norm,none"] == ours["acc_norm"]



def test_our_scorer_equals_lm_evals_transformers_backend_on_the_exported_model(trained_run, tmp_path):
    """An independent implementation: lm-eval's HFLM, transformers' Llama and the tokenizer through transformers."""
    pytest.importorskip("accelerate")  # lm-eval's HF backend imports it
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    from lmforge.evaluation.loglikelihood import score_continuations
    from lmforge.interop.hf import export_hf

    export_hf(trained_run, tmp_path / "hf")
    peer = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=4, add_bos_token=True)
    requests = [(item["context"], " " + choice) for item in ITEMS for choice in item["choices"]]
    requests += [(" ".join(["The json module"] * 30), " encodes JSON.")]  # longer than the window: both keep the end
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    ours = score_continuations(model, tokenizer, requests, batch_size=3)
    theirs = peer.loglikelihood([SimpleNamespace(args=request) for request in requests], disable_tqdm=True)
    assert [score.logprob for score in ours] == pytest.approx([logprob for logprob, _ in theirs], abs=1e-4)
    assert [score.is_greedy for score in ours] == [greedy for _, greedy in theirs]
