import json
import math
import random

import pytest
import sacrebleu
import torch
from sklearn import metrics as sk

from lmforge.errors import LmforgeError
from lmforge.evaluation.report import load_for_inference
from lmforge.evaluation.task_metrics import (ClassificationExample, GenerationExample, classification_metrics, classify_by_prompting,
                                             evaluate_classification, evaluate_generation, fit_prompt, generation_metrics,
                                             read_classification_examples, read_generation_examples)
from lmforge.inference.generate import SamplingParams, generate


@pytest.fixture(scope="module")
def tiny_model(trained_run):
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    return model, tokenizer


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def test_bleu_and_chrf_equal_sacrebleu_with_one_reference():
    predictions = ["the quick brown fox jumps over the dog", "a man walks in the park today", "it is raining"]
    references = ["the quick brown fox jumped over the lazy dog", "a man is walking in the park", "it rains heavily today"]
    scores = generation_metrics(predictions, [[r] for r in references])
    assert scores["count"] == 3
    assert math.isclose(scores["bleu"], sacrebleu.corpus_bleu(predictions, [references]).score)
    assert math.isclose(scores["chrf"], sacrebleu.corpus_chrf(predictions, [references]).score)


def test_bleu_and_chrf_equal_sacrebleu_with_ragged_references():
    predictions = ["the quick brown fox jumps over the dog", "a man walks in the park today", "it is raining"]
    references = [["the quick brown fox jumped over the lazy dog", "a fast brown fox leaps over the dog"],
                  ["a man is walking in the park"],
                  ["it rains heavily today", "it is raining now", "rain is falling"]]
    scores = generation_metrics(predictions, references)
    # An independent route to full streams: repeat an example's first reference. A duplicate changes
    # neither BLEU's clipped n-gram counts and closest reference length nor chrF's best reference.
    padded = [refs + [refs[0]] * (3 - len(refs)) for refs in references]
    streams = [list(stream) for stream in zip(*padded)]
    assert math.isclose(scores["bleu"], sacrebleu.corpus_bleu(predictions, streams).score)
    assert math.isclose(scores["chrf"], sacrebleu.corpus_chrf(predictions, streams).score)
    # sacrebleu's own convention for a missing reference (None) agrees.
    with_none = [[refs[k] if k < len(refs) else None for refs in references] for k in range(3)]
    assert math.isclose(scores["bleu"], sacrebleu.corpus_bleu(predictions, with_none).score)
    # The extra references matter: scoring the first reference only gives a different number.
    assert not math.isclose(scores["bleu"], sacrebleu.corpus_bleu(predictions, [[refs[0] for refs in references]]).score)


def test_a_perfect_prediction_scores_100_and_an_unrelated_one_scores_low():
    text = "the cat sat on the mat by the door"
    perfect = generation_metrics([text], [[text]])
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "f1"):
        assert math.isclose(perfect[key], 100.0), key
    unrelated = generation_metrics(["zebra quantum xylophone"], [[text]])
    assert unrelated["bleu"] < 1 and unrelated["chrf"] < 20
    for key in ("rouge1", "rouge2", "rougeL", "exact_match", "f1"):
        assert unrelated[key] == 0.0, key


def test_rouge_by_hand():
    # Every word has at most 3 letters, so the stemmer (which only stems longer words) changes nothing.
    # 1) prediction "the cat sat on the mat" (6 words), reference "the cat lay on the red mat" (7 words).
    #    unigrams shared (clipped): the, the, cat, on, mat = 5  -> F = 2*5 / (6+7) = 10/13
    #    bigrams: prediction the-cat cat-sat sat-on on-the the-mat (5), reference the-cat cat-lay lay-on
    #    on-the the-red red-mat (6); shared the-cat, on-the = 2  -> F = 2*2 / (5+6) = 4/11
    #    longest common subsequence: the cat on the mat = 5  -> F = 2*5 / 13 = 10/13
    # 2) prediction "on the mat the cat sat", reference "the cat sat on the mat" (6 words each).
    #    unigrams shared: all 6  -> F = 1
    #    bigrams: prediction on-the the-mat mat-the the-cat cat-sat, reference the-cat cat-sat sat-on
    #    on-the the-mat; shared on-the the-mat the-cat cat-sat = 4 of 5 each  -> F = 4/5
    #    longest common subsequence: "the cat sat" (or "on the mat") = 3  -> F = 2*3 / 12 = 1/2
    scores = generation_metrics(["the cat sat on the mat", "on the mat the cat sat"],
                                [["the cat lay on the red mat"], ["the cat sat on the mat"]])
    assert math.isclose(scores["rouge1"], 100 * (10 / 13 + 1) / 2)
    assert math.isclose(scores["rouge2"], 100 * (4 / 11 + 4 / 5) / 2)
    assert math.isclose(scores["rougeL"], 100 * (10 / 13 + 1 / 2) / 2)


def test_rouge_takes_the_best_reference_and_stems():
    references = ["a dog ran home", "the cat lay on the red mat"]
    for refs in (references, references[::-1]):
        scores = generation_metrics(["the cat sat on the mat"], [refs])
        assert math.isclose(scores["rouge1"], 100 * 10 / 13) and math.isclose(scores["rouge2"], 100 * 4 / 11)
    # Porter stemming: cats -> cat, running -> run, runs -> run.
    assert generation_metrics(["cats running"], [["cat runs"]])["rouge1"] == 100.0


def test_exact_match_and_f1_by_hand():
    # Case, punctuation and articles are normalised away: "The Eiffel Tower!" == "eiffel tower".
    assert generation_metrics(["The Eiffel Tower!"], [["eiffel tower"]])["exact_match"] == 100.0
    assert generation_metrics(["U.S.A."], [["an usa"]])["exact_match"] == 100.0
    # "red barn" vs "the red barn door" -> [red, barn] vs [red, barn, door]: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    partial = generation_metrics(["red barn"], [["the red barn door"]])
    assert partial["exact_match"] == 0.0 and math.isclose(partial["f1"], 80.0)
    # Best over references, then the mean over examples: (1 + 0.8) / 2 and (1 + 0) / 2.
    scores = generation_metrics(["Paris", "red barn"], [["London", "paris."], ["the red barn door", "a blue house"]])
    assert math.isclose(scores["f1"], 90.0) and math.isclose(scores["exact_match"], 50.0)


def test_classification_metrics_by_hand():
    true = ["a", "a", "a", "b", "b", "c", "c"]
    predicted = ["a", "a", "b", "a", "b", "a", "b"]  # "c" is never predicted
    scores = classification_metrics(true, predicted)
    assert scores["labels"] == ["a", "b", "c"]
    assert scores["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert math.isclose(scores["accuracy"], 3 / 7)
    # a: 2 right of 4 predicted, 3 true -> P 1/2, R 2/3, F1 4/7; b: 1 of 3 predicted, 2 true -> P 1/3, R 1/2, F1 2/5
    expected = {"a": (1 / 2, 2 / 3, 4 / 7, 3), "b": (1 / 3, 1 / 2, 2 / 5, 2), "c": (0, 0, 0, 2)}
    for label, (precision, recall, f1, support) in expected.items():
        got = scores["per_class"][label]
        assert math.isclose(got["precision"], precision) and math.isclose(got["recall"], recall)
        assert math.isclose(got["f1"], f1, abs_tol=1e-12) and got["support"] == support
    assert math.isclose(scores["macro"]["precision"], 5 / 18) and math.isclose(scores["macro"]["recall"], 7 / 18)
    assert math.isclose(scores["macro"]["f1"], 34 / 105)  # the mean of per-class F1s: (4/7 + 2/5 + 0) / 3
    for key in ("precision", "recall", "f1"):
        assert math.isclose(scores["micro"][key], 3 / 7)  # single-label: micro averages equal accuracy
    reordered = classification_metrics(true, predicted, labels=["c", "b", "a", "d"])
    assert reordered["labels"] == ["c", "b", "a", "d"]
    assert reordered["confusion_matrix"] == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    assert reordered["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_classification_metrics_equal_scikit_learn():
    rng = random.Random(0)
    labels = ["cat", "dog", "bird", "fish", "frog"]
    true = rng.choices(labels, weights=[5, 3, 2, 1, 1], k=200)
    predicted = [t if rng.random() < 0.5 else rng.choice(labels[:4]) for t in true]
    predicted = [p if p != "frog" else "cat" for p in predicted]  # "frog" is never predicted
    scores = classification_metrics(true, predicted, labels=labels)
    assert math.isclose(scores["accuracy"], sk.accuracy_score(true, predicted))
    assert scores["confusion_matrix"] == sk.confusion_matrix(true, predicted, labels=labels).tolist()
    precision, recall, f1, support = sk.precision_recall_fscore_support(true, predicted, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        got = scores["per_class"][label]
        assert math.isclose(got["precision"], precision[i], abs_tol=1e-12) and math.isclose(got["recall"], recall[i], abs_tol=1e-12)
        assert math.isclose(got["f1"], f1[i], abs_tol=1e-12) and got["support"] == support[i]
    for average in ("macro", "micro"):
        expected = sk.precision_recall_fscore_support(true, predicted, labels=labels, average=average, zero_division=0)
        assert all(math.isclose(scores[average][key], value) for key, value in zip(("precision", "recall", "f1"), expected))


def reference_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference: one forward pass over BOS + text, log-softmax, sum over the continuation."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(context_ids)] == context_ids  # the test texts keep the boundary between tokens
    ids = [tokenizer.bos_id, *whole]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    # Input position p predicts ids[p + 1]; the continuation starts at ids[1 + len(context_ids)].
    return sum(float(log_probs[p, ids[p + 1]]) for p in range(len(context_ids), len(ids) - 1))


def test_classify_by_prompting_picks_the_most_likely_option(tiny_model):
    model, tokenizer = tiny_model
    texts = ["Return the value of the named attribute of object.", "The for statement is used to iterate",
             "Raise an exception if the condition is false.", "def f(x): return x + 1"]
    options = ["function", "statement", "exception handling", "class"]
    predictions = classify_by_prompting(model, tokenizer, texts, options, batch_size=3)
    expected = []
    for text in texts:
        logprobs = [reference_logprob(model, tokenizer, f"{text}\nLabel:", " " + option) for option in options]
        best, runner_up = sorted(logprobs, reverse=True)[:2]
        assert best - runner_up > 1e-3  # no near-tie that rounding could flip
        expected.append(options[logprobs.index(best)])
    assert predictions == expected
    labels = ["function", "statement", "exception handling", "function"]
    result = evaluate_classification(model, tokenizer, [ClassificationExample(t, l) for t, l in zip(texts, labels)], options=options)
    assert result["options"] == options and [e["prediction"] for e in result["examples"]] == expected
    assert result["metrics"] == classification_metrics(labels, expected, labels=options)
    json.dumps(result)


def test_classification_needs_two_options_known_labels_and_a_template(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(LmforgeError, match="at least 2"):
        evaluate_classification(model, tokenizer, [ClassificationExample("some text", "yes")])
    with pytest.raises(LmforgeError, match="not among the options"):
        evaluate_classification(model, tokenizer, [ClassificationExample("some text", "maybe")], options=["yes", "no"])
    with pytest.raises(LmforgeError, match="must contain"):
        classify_by_prompting(model, tokenizer, ["some text"], ["yes", "no"], template="Label:")


def test_evaluate_generation_equals_greedy_generate(tiny_model):
    model, tokenizer = tiny_model
    prompts = ["The return statement", "Return the value of", "A class definition"]
    examples = [GenerationExample(p, ["a reference text", "another one"]) for p in prompts]
    result = evaluate_generation(model, tokenizer, examples, max_new_tokens=8, stop=())
    params = SamplingParams(max_new_tokens=8, temperature=0)
    greedy = ["".join(generate(model, tokenizer, prompt, params)).strip() for prompt in prompts]
    assert [row["prediction"] for row in result["examples"]] == greedy
    assert all(greedy)  # non-empty, so the exact-match check below means something
    metrics = result["metrics"]
    assert metrics["count"] == 3 and metrics["truncated_prompts"] == 0
    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "f1"):
        assert 0 <= metrics[key] <= 100, key
    json.dumps(result)
    own = evaluate_generation(model, tokenizer, [GenerationExample(p, ["unrelated", g]) for p, g in zip(prompts, greedy)],
                              max_new_tokens=8, stop=())
    assert own["metrics"]["exact_match"] == 100.0 and own["metrics"]["f1"] == 100.0


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(tiny_model):
    model, tokenizer = tiny_model
    context = model.config.context_length
    long_prompt = "The object of the statement is evaluated once. " * 20 + "The return value"
    kept = fit_prompt(tokenizer, long_prompt, context - 1 - 8)
    assert long_prompt.endswith(kept) and len(kept) < len(long_prompt)
    assert context - 1 - 8 - 3 <= len(tokenizer.encode(kept)) <= context - 1 - 8
    result = evaluate_generation(model, tokenizer, [GenerationExample(long_prompt, ["x"]), GenerationExample("The", ["y"])],
                                 max_new_tokens=8)
    assert result["metrics"]["truncated_prompts"] == 1
    assert [row["truncated"] for row in result["examples"]] == [True, False]
    assert result["examples"][0]["prompt"] == long_prompt
    params = SamplingParams(max_new_tokens=8, temperature=0, stop=["\n"])
    assert result["examples"][0]["prediction"] == "".join(generate(model, tokenizer, kept, params)).strip()
    with pytest.raises(LmforgeError, match="leaves no room"):
        evaluate_generation(model, tokenizer, [GenerationExample("The", ["y"])], max_new_tokens=context)


def test_reading_examples(tmp_path):
    path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Q1", "reference": "A1"}, "", {"prompt": "Q2", "reference": ["A2", "B2"]},
                                                "   ", {"prompt": "Q3", "references": ["A3"]}])
    assert read_generation_examples(path) == [GenerationExample("Q1", ["A1"]), GenerationExample("Q2", ["A2", "B2"]),
                                              GenerationExample("Q3", ["A3"])]
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "good film", "label": "pos"}, {"text": "dull", "label": "neg"}])
    assert read_classification_examples(path) == [ClassificationExample("good film", "pos"), ClassificationExample("dull", "neg")]


GOOD_GENERATION = {"prompt": "Q", "reference": "A"}


@pytest.mark.parametrize("bad_line, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"reference": "A"}, "missing field 'prompt'"),
    ({"prompt": "  ", "reference": "A"}, "field 'prompt' is empty"),
    ({"prompt": 3, "reference": "A"}, "must be a string"),
    ({"prompt": "Q"}, "exactly one of"),
    ({"prompt": "Q", "reference": "A", "references": ["B"]}, "exactly one of"),
    ({"prompt": "Q", "references": []}, "is empty"),
    ({"prompt": "Q", "references": ["B", 7]}, "a string or a list of strings"),
])
def test_a_bad_generation_line_names_file_and_line(tmp_path, bad_line, fragment):
    path = write_jsonl(tmp_path / "gen.jsonl", [GOOD_GENERATION, "", bad_line])  # the blank line still counts
    with pytest.raises(LmforgeError, match=fragment) as caught:
        read_generation_examples(path)
    assert str(caught.value).startswith(f"{path}:3: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize("bad_line, fragment", [
    ({"text": "fine"}, "missing field 'label'"),
    ({"text": "fine", "label": ["pos"]}, "must be a string"),
    ({"text": "", "label": "pos"}, "field 'text' is empty"),
])
def test_a_bad_classification_line_names_file_and_line(tmp_path, bad_line, fragment):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "ok", "label": "pos"}, bad_line])
    with pytest.raises(LmforgeError, match=fragment) as caught:
        read_classification_examples(path)
    assert str(caught.value).startswith(f"{path}:2: ")


def test_a_missing_or_empty_file_is_a_clear_error(tmp_path):
    with pytest.raises(LmforgeError, match="file not found"):
        read_generation_examples(tmp_path / "nope.jsonl")
    with pytest.raises(LmforgeError, match="holds no classification records"):
        read_classification_examples(write_jsonl(tmp_path / "blank.jsonl", ["", " "]))
