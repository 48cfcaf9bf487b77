"""Log-likelihood scoring: the one primitive behind multiple-choice benchmarks, the lm-eval adapter,
classification by label options and sliding-window perplexity.

Every text is scored as training laid documents out: a BOS token first, then the text. A request
``(context, continuation)`` is scored as lm-eval's Hugging Face backend scores it: whitespace at the end
of the context moves to the start of the continuation (byte-level BPE attaches a space to the word after
it), the whole string is encoded once, and the continuation is whatever tokens follow the encoded
context. When context plus continuation is longer than the model's window, the oldest context tokens
are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Continuation:
    """The score of one continuation given its context."""

    logprob: float  # natural log of P(continuation | context), summed over its tokens
    is_greedy: bool  # every continuation token is the model's most likely token at its position
    tokens: int  # how many tokens the continuation has


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS first, continuation ids)."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if whole[: len(context_ids)] != context_ids:
        # The merge across the boundary changed the context's last token; score the parts separately.
        continuation_ids = tokenizer.encode(continuation)
    else:
        continuation_ids = whole[len(context_ids) :]
    return [tokenizer.bos_id, *context_ids], continuation_ids


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _target_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(target) at every position, whether the target is the most likely token), both (B, T) on the CPU.

    Only these two numbers per position leave the device, never the (B, T, vocab) distribution.
    """
    from lmforge.training.device import autocast

    device = _model_device(model)
    inputs, targets = inputs.to(device), targets.to(device)
    with autocast(device, dtype):
        logits = model(inputs)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(2, targets[..., None]).squeeze(-1)
    greedy = log_probs.argmax(dim=-1) == targets
    return chosen.double().cpu(), greedy.cpu()


@torch.no_grad()
def score_token_pairs(model, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16, dtype=None) -> list[Continuation]:
    """Score ``(context_ids, continuation_ids)`` pairs; the context must hold at least one token (BOS)."""
    context_length = model.config.context_length
    was_training = model.training
    model.eval()
    results: list[Continuation | None] = [None] * len(pairs)
    # Longest first so each batch pads little; the order of results is restored below.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for first in range(0, len(order), batch_size):
        indices = order[first : first + batch_size]
        rows, spans = [], []
        for i in indices:
            context_ids, continuation_ids = pairs[i]
            if not context_ids:
                raise LmforgeError("a scored text needs at least one context token (BOS)")
            if not continuation_ids:
                raise LmforgeError(f"request {i + 1}: its continuation encodes to no tokens; there is nothing to score")
            if len(continuation_ids) > context_length:
                raise LmforgeError(f"request {i + 1}: a continuation of {len(continuation_ids)} tokens does not fit the model's "
                                   f"context of {context_length}")
            sequence = (context_ids + continuation_ids)[-(context_length + 1) :]
            rows.append(sequence)
            spans.append((len(sequence) - 1 - len(continuation_ids), len(continuation_ids)))
        width = max(len(row) for row in rows) - 1
        inputs = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            # Right padding: causal attention never lets a real position see it.
            inputs[r, : len(row) - 1] = torch.tensor(row[:-1])
            targets[r, : len(row) - 1] = torch.tensor(row[1:])
        chosen, greedy = _target_logprobs(model, inputs, targets, dtype)
        for r, (i, (start, length)) in enumerate(zip(indices, spans)):
            results[i] = Continuation(float(chosen[r, start : start + length].sum()), bool(greedy[r, start : start + length].all()), length)
    model.train(was_training)
    return results  # type: ignore[return-value]


def score_continuations(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16) -> list[Continuation]:
    """Log-likelihood of each continuation given its context (text pairs)."""
    return score_token_pairs(model, [encode_pair(tokenizer, c, x) for c, x in requests], batch_size)


def sliding_windows(n_tokens: int, context_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows that score every token of a sequence after the first exactly once.

    Yields ``(start, end, first_scored)``: the window's inputs are ``ids[start:end-1]``, its targets
    ``ids[start+1:end]``, and only targets at positions ``>= first_scored`` count (earlier ones were
    scored by a previous window and serve as context here). The first window scores a full context; each
    later one scores ``stride`` new tokens with up to ``context_length - stride`` tokens of context before
    them. ``stride == context_length`` gives disjoint windows (lm-eval's rolling log-likelihood).
    """
    if not 1 <= stride <= context_length:
        raise LmforgeError(f"the stride must be between 1 and the context length {context_length} (got {stride})")
    scored_until = 1  # position 0 (BOS) is never a target
    while scored_until < n_tokens:
        end = min(scored_until + (context_length if scored_until == 1 else stride), n_tokens)
        yield max(0, end - 1 - context_length), end, scored_until
        scored_until = end


@torch.no_grad()
def token_logprobs(model, ids: Sequence[int], stride: int | None = None, batch_size: int = 16, dtype=None, progress=None) -> torch.Tensor:
    """Log-probability of each token ``ids[1:]`` given what precedes it, as a float64 tensor of len(ids)-1.

    Sequences longer than the model's context are scored in sliding windows (see ``sliding_windows``),
    so each token after the first context's worth sees at least ``context_length - stride`` tokens.
    ``progress``, if given, is a tqdm-like bar advanced once per window.
    """
    context_length = model.config.context_length
    stride = stride or context_length
    ids_tensor = torch.as_tensor(ids, dtype=torch.long)
    out = torch.empty(max(len(ids) - 1, 0), dtype=torch.float64)
    was_training = model.training
    model.eval()
    windows = list(sliding_windows(len(ids), context_length, stride))
    # Every window is context_length + 1 tokens long except, in a short sequence, the only one.
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        inputs = torch.stack([ids_tensor[start : end - 1] for start, end, _ in group])
        targets = torch.stack([ids_tensor[start + 1 : end] for start, end, _ in group])
        chosen, _ = _target_logprobs(model, inputs, targets, dtype)
        for row, (start, end, first_scored) in enumerate(group):
            out[first_scored - 1 : end - 1] = chosen[row, first_scored - start - 1 :]
        if progress is not None:
            progress.update(len(group))
    model.train(was_training)
    return out


def count_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """How many windows ``sliding_windows`` yields (for progress bars)."""
    if n_tokens <= 1:
        return 0
    after_first = max(n_tokens - 1 - context_length, 0)
    return 1 + -(-after_first // stride)


def rolling_logprob(model, tokenizer, text: str, stride: int | None = None, batch_size: int = 16) -> float:
    """Log-likelihood of a whole text (BOS first), any length: lm-eval's ``loglikelihood_rolling``."""
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    return float(token_logprobs(model, ids, stride, batch_size).sum())
