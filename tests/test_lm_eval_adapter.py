"""lm-eval runs an lmforge checkpoint through the adapter, on local task files, and agrees with lmforge's own scorer."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from lmforge.evaluation.benchmarks import evaluate_benchmark  # noqa: E402
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
    command = [sys.executable, "-m", "lmforge.interop.lm_eval_harness", "run", "--model", "lmforge",
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
