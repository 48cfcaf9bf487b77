"""Sampling text from a decoder with a KV cache, streamed piece by piece."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.inference.kv_cache import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 means greedy: always the most likely token, deterministic
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0:
            raise LmforgeError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise LmforgeError(f"top_k must be at least 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not self.repetition_penalty > 0:
            raise LmforgeError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, history: torch.Tensor) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` (B, V); ``history`` (B, T) is the ids so far."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history.numel():
        # CTRL-style penalty: make every token already present less likely, whatever the logit's sign.
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty))
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are complete characters.

    Ends at EOS, at ``max_new_tokens``, at the context limit, or just before the first stop string
    (which is not included).
    """
    params.validate()
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    context = model.config.context_length
    if len(prompt_ids) >= context:
        raise LmforgeError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}, leaving no room to generate")
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    cache = KVCache.for_model(model, batch_size=1, max_length=len(prompt_ids) + budget)
    history = torch.tensor([prompt_ids], device=device)
    logits = model(history, cache)[:, -1]
    decoder = tokenizer.stream_decoder()  # holds back bytes of a character split across tokens
    text, emitted = "", 0  # the continuation so far, and how much of it was yielded
    hold_back = max((len(s) for s in params.stop), default=1) - 1  # a tail that may still grow into a stop string
    for produced in range(1, budget + 1):
        token = next_token(logits, params, generator, history)
        if int(token) == tokenizer.eos_id:
            break
        history = torch.cat([history, token[:, None]], dim=1)
        text += decoder.push(int(token))
        stop_at = min((i for i in (text.find(s, max(emitted - len(s), 0)) for s in params.stop if s) if i >= 0), default=-1)
        if stop_at >= 0:
            if stop_at > emitted:
                yield text[emitted:stop_at]
            return
        if len(text) - hold_back > emitted:
            yield text[emitted : len(text) - hold_back]
            emitted = len(text) - hold_back
        if produced < budget:
            logits = model(token[:, None], cache)[:, -1]
    text += decoder.flush()
    if len(text) > emitted:
        yield text[emitted:]
