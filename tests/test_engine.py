"""The inference engine against independent references: uncached argmax decoding, full-forward
log-softmax, ``token_logprobs``; and its request lifecycle (queue, cancel, stop, errors, streaming)."""

import copy
import shutil
import threading

import pytest
import torch

from lmforge.evaluation.loglikelihood import token_logprobs
from lmforge.evaluation.report import load_for_inference
from lmforge.inference.engine import Engine, EngineStopped, InvalidPrompt, PromptTooLong, QueueFull, TokenEvent
from lmforge.inference.fast_decode import FastDecodeStep
from lmforge.inference.generate import SamplingParams, generate, sample_tokens
from lmforge.inference.kv_cache import SlotKVCache
from lmforge.models.decoder import Decoder, DecoderConfig

PROMPTS = ["The json module", "Return the", "class ", "A", "The built-in functions and the special method names of a class are"]


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    model, tokenizer, _ = load_for_inference(trained_run, device="cpu")
    return model, tokenizer


@pytest.fixture
def engine(model_and_tokenizer):
    engine = Engine(*model_and_tokenizer, max_batch_size=3, max_queue=16).start()
    yield engine
    engine.stop(drain=False)


def prompt_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def greedy_reference(model, ids: list[int], steps: int, eos_id: int) -> list[int]:
    """Argmax decoding without a KV cache: the whole sequence through the model every step (EOS included)."""
    ids, produced = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            produced.append(token)
            if token == eos_id:
                break
            ids.append(token)
    return produced


@pytest.mark.parametrize("fast_decode", [True, False])
def test_batched_greedy_equals_generate_and_uncached_argmax(model_and_tokenizer, fast_decode):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=3, max_queue=16, fast_decode=fast_decode).start()
    params = SamplingParams(temperature=0, max_new_tokens=24)
    # Five prompts on three slots: two wait and join the batch when others finish.
    handles = [engine.submit(prompt_ids(tokenizer, p), params) for p in PROMPTS]
    results = [handle.wait() for handle in handles]
    assert list(handles[0].events())[-1] is results[0]  # waiting leaves the streamed events in place
    for prompt, result in zip(PROMPTS, results):
        expected = greedy_reference(model, prompt_ids(tokenizer, prompt), 24, tokenizer.eos_id)
        assert result.token_ids == expected, prompt
        assert result.finish_reason == ("stop" if expected[-1] == tokenizer.eos_id else "length")
        assert result.text == "".join(generate(model, tokenizer, prompt, params))
        assert result.text == tokenizer.decode(t for t in expected if t != tokenizer.eos_id)
    engine.stop()


@pytest.mark.parametrize("fast_decode", [True, False])
def test_requests_joining_a_running_batch_do_not_change_its_results(model_and_tokenizer, fast_decode):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=3, fast_decode=fast_decode)  # not started: step() runs one step here
    first = engine.submit(prompt_ids(tokenizer, PROMPTS[0]), SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
    later = []
    for step, prompt in enumerate(PROMPTS[1:4]):
        for _ in range(4 + step):  # each newcomer joins at a different position of the running ones
            engine.step()
        later.append(engine.submit(prompt_ids(tokenizer, prompt), SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)))
    results = [list(handle.events())[-1] for handle in [first, *later]]
    assert [len(r.token_ids) for r in results] == [30, 12, 12, 12]
    for prompt, result in zip(PROMPTS, results):
        reference = greedy_reference(model, prompt_ids(tokenizer, prompt), len(result.token_ids), eos_id=-1)
        assert result.token_ids == reference and result.finish_reason == "length"


@pytest.mark.parametrize("kv_heads, mlp, qk_norm, tied",
                         [(4, "relu2", False, False), (2, "swiglu", True, True), (1, "swiglu", False, False)])
def test_fused_decode_step_equals_the_model(kv_heads, mlp, qk_norm, tied):
    """FastDecodeStep re-arranges the weights; its logits must be Decoder.forward's, whatever the architecture."""
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=97, n_layers=2, d_model=64, n_heads=4, n_kv_heads=kv_heads, ffn_hidden=96, context_length=32,
                           mlp=mlp, qk_norm=qk_norm, tie_embeddings=tied)
    model = Decoder(config).eval()
    with torch.no_grad():  # norms away from 1, so folding their weights into the matrices is tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    sequences = [torch.randint(0, 97, (length,)) for length in (6, 10, 3)]
    with torch.inference_mode():
        step = FastDecodeStep(model, SlotKVCache.for_model(model, slots=4))
        prompt_logits = torch.cat([step.prefill(sequence, slot) for slot, sequence in enumerate(sequences)])
        reference = torch.stack([model(sequence[None])[0, -1] for sequence in sequences])
        assert torch.allclose(prompt_logits, reference, atol=1e-5)
        for _ in range(3):  # rows at different positions, then one more token each
            new = torch.randint(0, 97, (3,))
            logits = step(new, rows=3, width=max(len(s) for s in sequences) + 1)
            sequences = [torch.cat([sequence, new[i : i + 1]]) for i, sequence in enumerate(sequences)]
            reference = torch.stack([model(sequence[None])[0, -1] for sequence in sequences])
            assert torch.allclose(logits, reference, atol=1e-5)
        equal = [torch.randint(0, 97, (7,)) for _ in range(2)]  # same lengths: no mask needed
        for slot, sequence in enumerate(equal):
            step.prefill(sequence[:-1], slot)
        logits = step(torch.stack([s[-1] for s in equal]), rows=2, width=7, same_length=True)
        assert torch.allclose(logits, torch.stack([model(s[None])[0, -1] for s in equal]), atol=1e-5)


def reference_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k and top-p by masking the whole vocabulary (the textbook definition)."""
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(params.top_k).values[-1], float("-inf"))
    probabilities = logits.softmax(dim=-1)
    if params.top_p is not None:
        sorted_probabilities, order = probabilities.sort(descending=True)
        drop = (sorted_probabilities.cumsum(dim=-1) - sorted_probabilities) >= params.top_p
        probabilities = probabilities.masked_fill(drop.scatter(0, order, drop), 0.0)
    return probabilities / probabilities.sum()


@pytest.mark.parametrize("settings, spread", [(dict(temperature=0.7, top_k=20), 3.0), (dict(temperature=1.0, top_p=0.8), 3.0),
                                              (dict(temperature=1.3, top_k=50, top_p=0.5), 3.0), (dict(temperature=1.0, top_p=0.95), 0.3),
                                              (dict(temperature=1.0), 2.0)])
def test_sampling_draws_from_the_top_k_top_p_distribution(settings, spread):
    # spread 0.3: a flat distribution whose top-p set holds more than the sampler's first 256 candidates.
    params = SamplingParams(**settings)
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1)) * spread
    expected = reference_distribution(logits, params)
    draws = sample_tokens(logits.expand(20_000, -1), params, torch.Generator().manual_seed(2))
    frequencies = torch.bincount(draws, minlength=300) / 20_000
    assert set(draws.tolist()) <= set(expected.nonzero().flatten().tolist())  # never a token the settings exclude
    assert (frequencies - expected).abs().max() < 0.015  # ~5 standard deviations of a frequency at p = 0.5


def test_seeded_sampling_is_the_same_alone_and_batched(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    seeded = SamplingParams(temperature=1.0, top_k=40, seed=7, max_new_tokens=30, ignore_eos=True)
    alone = Engine(model, tokenizer, max_batch_size=4).complete(prompt_ids(tokenizer, "The json module"), seeded)
    engine = Engine(model, tokenizer, max_batch_size=4)  # synchronous: the steps run in this thread
    others = [engine.submit(prompt_ids(tokenizer, p), SamplingParams(temperature=t, seed=s, max_new_tokens=30))
              for p, t, s in [("Return the", 1.0, 1), ("class ", 0.0, None), ("A", 0.7, None)]]
    batched = engine.complete(prompt_ids(tokenizer, "The json module"), seeded)
    assert batched.token_ids == alone.token_ids and batched.text == alone.text
    assert all(handle.done for handle in others)
    different_seed = Engine(model, tokenizer).complete(prompt_ids(tokenizer, "The json module"),
                                                       SamplingParams(**{**seeded.__dict__, "seed": 8}))
    assert different_seed.token_ids != alone.token_ids


def test_stop_strings_stop_tokens_and_length(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    ids = prompt_ids(tokenizer, "The json module")
    full = engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
    assert full.finish_reason == "length" and len(full.token_ids) == 40 == full.completion_tokens

    stop = full.text.strip()[len(full.text.strip()) // 2 :][:3]
    events = list(engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=40, stop=[stop], ignore_eos=True)).events())
    cut = events[-1]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == cut.text  # the held-back tail never leaks the stop

    stop_token = full.token_ids[10]
    by_token = engine.complete(ids, SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[stop_token], ignore_eos=True))
    first = full.token_ids.index(stop_token)
    assert by_token.finish_reason == "stop" and by_token.token_ids == full.token_ids[: first + 1]
    assert by_token.text == tokenizer.decode(full.token_ids[:first])


def test_logprobs_and_top_alternatives_equal_a_full_forward(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    ids = prompt_ids(tokenizer, "Return the")
    result = engine.complete(ids, SamplingParams(temperature=0.9, top_k=20, seed=3, max_new_tokens=15, ignore_eos=True), top_logprobs=4)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids + result.token_ids]))[0].double(), dim=-1)
    for step, (token, logprob, top) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs)):
        row = log_probs[len(ids) - 1 + step]
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        best = row.topk(4)
        assert [t for t, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)

    scores = engine.score(ids + result.token_ids, top_logprobs=3)
    assert scores.logprobs[0] is None and scores.top_logprobs[0] is None
    reference = token_logprobs(model, ids + result.token_ids).tolist()
    assert scores.logprobs[1:] == pytest.approx(reference, abs=1e-9)
    assert [t for t, _ in scores.top_logprobs[5]] == log_probs[4].topk(3).indices.tolist()


def test_invalid_requests_are_clear_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    with pytest.raises(PromptTooLong, match=r"60 tokens and max_new_tokens is 10: 70 tokens .* context of 64"):
        engine.submit([tokenizer.bos_id] * 60, SamplingParams(max_new_tokens=10))
    with pytest.raises(InvalidPrompt, match="no tokens"):
        engine.submit([], SamplingParams())
    with pytest.raises(InvalidPrompt, match="outside the vocabulary of 512"):
        engine.submit([0, 5, 512], SamplingParams(max_new_tokens=1))
    with pytest.raises(InvalidPrompt, match="outside the vocabulary"):
        engine.score([0, -1])


def test_queue_full_cancel_and_drain(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch_size=2, max_queue=3)  # not started: nothing runs until a step
    ids = prompt_ids(tokenizer, "class ")
    long = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    handles = [engine.submit(ids, long) for _ in range(3)]
    with pytest.raises(QueueFull, match="3 requests"):
        engine.submit(ids, long)
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 1
    handles[0].cancel()
    engine.step()  # the cancelled request leaves its slot and the waiting one takes it
    assert handles[0].result.finish_reason == "cancelled" and len(handles[0].result.token_ids) == 1
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 0
    engine.submit(ids, long)  # room in the queue again

    engine.start()
    engine.stop(drain=True)
    assert all(h.result.finish_reason == "length" and len(h.result.token_ids) == 40 for h in handles[1:])
    with pytest.raises(EngineStopped):
        engine.submit(ids, long)
    stats = engine.stats()
    assert stats["requests_finished"] == 4 and stats["requests_cancelled"] == 1 and stats["tokens_generated"] == 1 + 3 * 40


def test_stop_without_drain_cancels(model_and_tokenizer):
    engine = Engine(*model_and_tokenizer, max_batch_size=1).start()
    started = threading.Event()
    handles = [engine.submit([0, 5, 6], SamplingParams(max_new_tokens=60, ignore_eos=True), on_event=lambda e: started.set())
               for _ in range(2)]
    started.wait(timeout=30)
    engine.stop(drain=False)
    assert [h.result.finish_reason for h in handles] == ["cancelled", "cancelled"]


def test_a_failing_request_does_not_stop_the_others(engine, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer

    def failing(event):
        if isinstance(event, TokenEvent):
            raise RuntimeError("client handler broke")

    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    broken = engine.submit(prompt_ids(tokenizer, "A"), params, on_event=failing)
    healthy = engine.submit(prompt_ids(tokenizer, "A"), params)
    assert list(broken.events())[-1].finish_reason == "error" and "client handler broke" in broken.result.error
    assert list(healthy.events())[-1].finish_reason == "length"
    assert engine.complete(prompt_ids(tokenizer, "A"), params).token_ids == healthy.result.token_ids  # the loop lives on


def successor_model(model, successors: dict[int, int]):
    """A copy of ``model`` whose greedy next token depends only on the last one, as ``successors`` maps it.

    Attention and MLP outputs are zeroed, so the residual stream is the token's embedding; each mapped
    token embeds as a one-hot and the output layer maps that direction to the token's successor.
    """
    model = copy.deepcopy(model)
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # untie from the embeddings
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")):
                param.zero_()
            elif name == "model.norm.weight":
                param.fill_(1.0)
        for direction, (token, successor) in enumerate(successors.items()):
            model.model.embed_tokens.weight[token, direction] = 1.0
            model.lm_head.weight[successor, direction] = 1.0
    return model


def test_streamed_multibyte_characters_are_never_split(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    byte_tokens = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    first, second, third = [byte_tokens[bytes([b])] for b in "✓".encode()]  # three single-byte tokens, one character
    bos = tokenizer.bos_id
    forced = successor_model(model, {bos: first, first: second, second: third, third: first})
    events = list(Engine(forced, tokenizer).submit([bos], SamplingParams(temperature=0, max_new_tokens=9)).events())
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["", "", "✓"] * 3
    assert events[-1].text == "✓✓✓" and events[-1].finish_reason == "length"
    # The ending token of a chat turn stops generation without appearing in the text.
    end_id = tokenizer.token_id("<|end|>")
    forced = successor_model(model, {bos: first, first: second, second: third, third: end_id})
    result = Engine(forced, tokenizer).complete([bos], SamplingParams(temperature=0, stop_token_ids=[end_id], max_new_tokens=9))
    assert (result.text, result.finish_reason, result.token_ids) == ("✓", "stop", [first, second, third, end_id])


@pytest.mark.parametrize("settings", [dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=1e-6, top_k=5),
                                      dict(temperature=1.0, top_k=1), dict(temperature=1.0, top_p=1e-300),
                                      dict(temperature=1e-4, top_p=0.9)])
def test_extreme_sampling_settings_pick_the_most_likely_token(settings):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    logits[1] *= 1e4  # large logits must not overflow when divided by a tiny temperature
    tokens = sample_tokens(logits, SamplingParams(**settings), torch.Generator().manual_seed(4))
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
def test_extreme_repetition_penalties_give_valid_tokens(penalty):
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(5)) * 3
    logits[:, 7] = 0.0  # 0 * inf would be NaN
    seen = torch.zeros(3, 300, dtype=torch.bool)
    best = logits.argmax(dim=-1)
    seen[torch.arange(3), best] = True
    seen[:, 7] = True
    for temperature in (0.0, 1e-3, 1.0):
        tokens = sample_tokens(logits, SamplingParams(temperature=temperature, repetition_penalty=penalty), None, seen)
        assert ((tokens >= 0) & (tokens < 300)).all()
        if penalty > 1 and temperature < 1:  # the best token was seen: a huge penalty rules it out
            assert (tokens != best).all()


def test_a_row_of_nan_logits_leaves_the_other_rows_alone():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(6))
    for settings in (dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.0, top_p=0.9)):
        params = SamplingParams(**settings)
        clean = sample_tokens(logits, params, [torch.Generator().manual_seed(i) for i in range(3)]).tolist()
        poisoned = logits.clone()
        poisoned[1, 5] = float("nan")
        tokens = sample_tokens(poisoned, params, [torch.Generator().manual_seed(i) for i in range(3)]).tolist()
        assert 0 <= tokens[1] < 300 and (tokens[0], tokens[2]) == (clean[0], clean[2])


def test_one_requests_bad_numbers_fail_only_that_request(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    poisoned_id = tokenizer.encode("class")[0]
    broken_model = copy.deepcopy(model)
    broken_model.lm_head.weight = torch.nn.Parameter(broken_model.lm_head.weight.detach().clone())  # untie
    with torch.no_grad():
        broken_model.model.embed_tokens.weight[poisoned_id] = float("nan")  # any sequence holding it has NaN logits
    for fast_decode in (True, False):
        engine = Engine(broken_model, tokenizer, max_batch_size=8, fast_decode=fast_decode)
        greedy = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        extreme = [dict(temperature=1e-40), dict(temperature=1e-300), dict(temperature=1.0, top_k=1),
                   dict(temperature=1.0, top_p=1e-300), dict(temperature=1e-300, repetition_penalty=1e-300),
                   dict(temperature=0.5, repetition_penalty=1e300)]
        handles = [engine.submit(prompt_ids(tokenizer, "A"), SamplingParams(**{**greedy.__dict__, **s})) for s in extreme]
        poisoned = [engine.submit([tokenizer.bos_id, poisoned_id], SamplingParams(**{**greedy.__dict__, **s}))
                    for s in (dict(temperature=0), dict(temperature=0.8, top_p=0.9))]
        healthy = engine.submit(prompt_ids(tokenizer, "A"), greedy)
        assert healthy.wait().finish_reason == "length"
        for handle in poisoned:
            assert handle.wait().finish_reason == "error" and "not finite" in handle.result.error
        results = [handle.wait() for handle in handles]
        for result in results:  # a sampled request that drew the poisoned token itself has NaN logits from then on
            assert (result.finish_reason, len(result.token_ids)) == ("length", 8) or (
                result.finish_reason == "error" and result.token_ids[-1] == poisoned_id), (result, poisoned_id)
        assert [r.token_ids for r in results[:4]] == [healthy.result.token_ids] * 4  # tiny temperature / top_k 1 / top_p: greedy


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on CPU needs a C++ compiler")
def test_compiled_single_stream_step_gives_the_eager_results(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    compiled = Engine(model, tokenizer, max_batch_size=2, compile=True)
    assert compiled._fast_decode._compiled_single is not None  # it compiled (else: a warning and the eager step)
    eager = Engine(model, tokenizer, max_batch_size=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_k=40, seed=3, max_new_tokens=20, ignore_eos=True)
    for text in PROMPTS[:3]:
        for params in (greedy, seeded):
            mine, reference = (e.complete(prompt_ids(tokenizer, text), params, top_logprobs=2) for e in (compiled, eager))
            assert mine.token_ids == reference.token_ids
            assert max(abs(a - b) for a, b in zip(mine.logprobs, reference.logprobs)) < 1e-4
    handles = [compiled.submit(prompt_ids(tokenizer, text), greedy) for text in PROMPTS[:2]]  # batch 2: the eager step
    assert [h.wait().token_ids for h in handles] == [eager.complete(prompt_ids(tokenizer, t), greedy).token_ids for t in PROMPTS[:2]]


def test_a_failed_compile_warns_and_keeps_the_eager_step(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.warns(RuntimeWarning, match="stays eager: RuntimeError: no C\\+\\+ compiler found"):
        engine = Engine(model, tokenizer, max_batch_size=1, compile=True)
    greedy = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    ids = prompt_ids(tokenizer, "Return the")
    assert engine.complete(ids, greedy).token_ids == Engine(model, tokenizer, max_batch_size=1).complete(ids, greedy).token_ids
