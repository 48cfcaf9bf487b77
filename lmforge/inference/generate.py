"""Sampling text from a decoder with a KV cache, streamed piece by piece.

``SamplingParams`` and the sampling functions here are shared by ``generate`` and the inference engine
(``lmforge.inference.engine``); ``generate`` itself is a one-request engine run in the calling thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError


# Temperatures below this sample greedily: dividing logits by them overflows float32 (1e-40 is not
# even a float32), and their distributions are the argmax anyway up to ties a few ulps apart.
GREEDY_BELOW = 1e-5
# Penalised logits are clamped to this magnitude, so that dividing by any temperature >= GREEDY_BELOW
# stays finite in float32 (max ~3.4e38) whatever the repetition penalty.
_LOGIT_LIMIT = 1e30


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 (or below GREEDY_BELOW) means greedy: always the most likely token, deterministic
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Generation also ends ("stop") at any of these ids, e.g. the chat template's <|end|>; EOS always ends it.
    stop_token_ids: list[int] = field(default_factory=list)
    # Benchmarks only: EOS is an ordinary token, so exactly max_new_tokens are generated (unless a stop is set).
    ignore_eos: bool = False

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

    def sampling_key(self) -> tuple:
        """What decides how logits turn into a token: requests with equal keys are sampled as one batch."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def penalise_repeats(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Apply the repetition penalty to float ``logits`` (B, V); ``seen`` (B, V) marks each row's tokens so far."""
    if params.repetition_penalty == 1.0 or seen is None:
        return logits
    # CTRL-style penalty: make every token already present less likely, whatever the logit's sign.
    # An extreme penalty must give huge logits, not inf or NaN: 1e-300 is 0 in float32 and 1e300 is inf
    # (0 * inf is NaN), so the penalty is held within [1e-30, 1e30] (no token's fate differs beyond that)
    # and the results within +-1e30.
    penalty = min(max(params.repetition_penalty, 1 / _LOGIT_LIMIT), _LOGIT_LIMIT)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised.clamp(-_LOGIT_LIMIT, _LOGIT_LIMIT), logits)


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generators: torch.Generator | Sequence[torch.Generator | None] | None,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of float ``logits`` (B, V), on the logits' device.

    Repetition penalty, then temperature, top-k and top-p, as the parameters say. ``generators`` is one
    generator for the whole batch, or one per row (None: the global generator), so a seeded request
    draws the same numbers whichever other rows it is batched with.

    Numerically safe for any valid parameters: finite logits give a valid token whatever the
    temperature, top-p or repetition penalty (no inf or NaN arises). A row holding NaN or +inf logits
    still gets an id in range, but a meaningless one, without disturbing the other rows: the caller
    checks its logits (the engine fails just that request, spotting NaN log-probabilities).
    """
    logits = penalise_repeats(logits, params, seen)
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    # Only the candidates that top-k / top-p can keep enter the softmax and the draw: top-k's values
    # come out sorted, which top-p needs, and a 50-way draw is far cheaper than a vocabulary-wide one.
    candidates = None
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        # Dividing by a positive temperature keeps the order: divide only the k candidates (same values).
        logits, candidates = torch.topk(logits, params.top_k, dim=-1)
        logits = logits / params.temperature
        probabilities = logits.softmax(dim=-1)
    elif params.top_p is not None and params.top_p < 1.0:
        logits = logits / params.temperature
        log_normaliser = logits.logsumexp(dim=-1, keepdim=True)  # top-p compares probabilities over the whole vocabulary
        logits, candidates = _top_p_candidates(logits, params.top_p, log_normaliser)
        probabilities = (logits - log_normaliser).exp()
    else:
        logits = logits / params.temperature
        probabilities = logits.softmax(dim=-1)
    cumulative = probabilities.cumsum(dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        # (top_p below float32's smallest normal number would round to 0 and drop the first token too.)
        top_p = max(params.top_p, torch.finfo(probabilities.dtype).tiny)
        probabilities = probabilities.masked_fill(cumulative - probabilities >= top_p, 0.0)
        cumulative = probabilities.cumsum(dim=-1)
    # Inverse-CDF draw: one uniform number per row (torch.multinomial draws one per vocabulary entry on
    # CPU). With u in (0, 1], the first position whose cumulative sum reaches u * total always has a
    # non-zero probability, and it exists because u * total <= total.
    threshold = (1.0 - _uniform(logits.shape[0], generators, logits.device)) * cumulative[:, -1:]
    # (The clamp only matters for a row of NaN probabilities, where the search may run off the end.)
    choice = torch.searchsorted(cumulative, threshold).clamp_(max=cumulative.shape[-1] - 1)
    return (candidates.gather(1, choice) if candidates is not None else choice).squeeze(-1)


def _top_p_candidates(logits: torch.Tensor, top_p: float, log_normaliser: torch.Tensor,
                      first_try: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits sorted best first, and their ids, covering at least every token top-p can keep.

    Sorting a whole vocabulary is slow on CPU (milliseconds for a batch); the ``first_try`` best tokens
    usually hold top_p of the probability already, and whatever lies beyond them is dropped anyway.
    """
    if first_try < logits.shape[-1]:
        values, ids = torch.topk(logits, first_try, dim=-1)
        covered = (values - log_normaliser).exp().sum(dim=-1)
        if bool((covered >= top_p).all()):
            return values, ids
    return torch.sort(logits, descending=True, dim=-1)


def _uniform(rows: int, generators, device) -> torch.Tensor:
    """(rows, 1) uniform numbers in [0, 1), from one generator or one per row."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand((rows, 1), generator=generators, device=device)
    if all(generator is None for generator in generators):
        return torch.rand((rows, 1), device=device)
    return torch.cat([torch.rand((1, 1), generator=generator, device=device) for generator in generators])


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, history: torch.Tensor) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` (B, V); ``history`` (B, T) is the ids so far."""
    logits = logits.float()
    seen = None
    if params.repetition_penalty != 1.0 and history.numel():
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, history, True)
    return sample_tokens(logits, params, generator, seen)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as soon as they are complete characters.

    Ends at EOS (or one of ``stop_token_ids``), at ``max_new_tokens``, at the context limit, or just
    before the first stop string (which is not included). Runs a one-request ``Engine`` in the caller's
    thread, so it samples, stops and streams exactly as the server does.
    """
    from lmforge.inference.engine import Engine, TokenEvent

    params.validate()
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    context = model.config.context_length
    if len(prompt_ids) >= context:
        raise LmforgeError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}, leaving no room to generate")
    # Unlike the engine, which refuses a request that cannot fit, generate() stops at the context limit.
    budget = min(params.max_new_tokens, context - len(prompt_ids))
    fitted = SamplingParams(**{**params.__dict__, "max_new_tokens": budget})
    # No fused decode step: building it re-arranges every weight, which one short request does not repay.
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=1, fast_decode=False)
    handle = engine.submit(prompt_ids, fitted)
    for event in handle.events():  # the engine was not started: events() runs its steps here
        if isinstance(event, TokenEvent):
            if event.text:
                yield event.text
        elif event.finish_reason == "error":
            raise handle.exception
