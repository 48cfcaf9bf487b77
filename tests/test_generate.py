import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.evaluation.report import load_for_inference
from lmforge.inference.generate import SamplingParams, generate, next_token


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    return model, tokenizer


def complete(model_and_tokenizer, prompt="The json module", **params):
    model, tokenizer = model_and_tokenizer
    return "".join(generate(model, tokenizer, prompt, SamplingParams(**params)))


def greedy_reference(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding without a KV cache or streaming: recompute the whole sequence every step."""
    ids, produced = [tokenizer.bos_id, *tokenizer.encode(prompt)], []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            produced.append(token)
    return tokenizer.decode(produced)


@pytest.mark.parametrize("prompt", ["The json module", "é ✓ "])
def test_greedy_streaming_equals_uncached_argmax(model_and_tokenizer, prompt):
    model, tokenizer = model_and_tokenizer
    pieces = list(generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=20)))
    assert "".join(pieces) == greedy_reference(model, tokenizer, prompt, 20)
    assert "".join(pieces) == complete(model_and_tokenizer, prompt, temperature=0, max_new_tokens=20)


def test_seeded_sampling_is_reproducible(model_and_tokenizer):
    first = complete(model_and_tokenizer, temperature=1.0, seed=7, max_new_tokens=20)
    assert first == complete(model_and_tokenizer, temperature=1.0, seed=7, max_new_tokens=20)
    others = {complete(model_and_tokenizer, temperature=1.0, seed=s, max_new_tokens=20) for s in range(8, 12)}
    assert len(others | {first}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(model_and_tokenizer):
    greedy = complete(model_and_tokenizer, temperature=0, max_new_tokens=12)
    assert complete(model_and_tokenizer, temperature=1.0, top_k=1, seed=3, max_new_tokens=12) == greedy
    assert complete(model_and_tokenizer, temperature=1.0, top_p=1e-6, seed=3, max_new_tokens=12) == greedy


def test_stop_string_ends_generation_before_it(model_and_tokenizer):
    full = complete(model_and_tokenizer, temperature=0, max_new_tokens=40)
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    cut = complete(model_and_tokenizer, temperature=0, max_new_tokens=40, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[1.0, 2.0, 3.0, 2.9]])
    history = torch.tensor([[2]])
    plain = next_token(logits, SamplingParams(temperature=0), None, history)
    penalised = next_token(logits, SamplingParams(temperature=0, repetition_penalty=1.5), None, history)
    assert int(plain) == 2 and int(penalised) == 3


def test_bad_sampling_settings_and_long_prompts_are_clear_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(LmforgeError, match="top_p"):
        complete(model_and_tokenizer, top_p=1.5)
    with pytest.raises(LmforgeError, match="temperature"):
        complete(model_and_tokenizer, temperature=-1)
    with pytest.raises(LmforgeError, match="context is 64"):
        complete(model_and_tokenizer, prompt="word " * 200)
