"""Intrinsic scores: cross-entropy, perplexity and bits per byte.

Bits per byte divides the total information (nats over every predicted token, converted to bits) by
the UTF-8 bytes of the text, so models with different tokenizers can be compared on the same text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmforge.training.batches import evaluation_windows
from lmforge.training.device import autocast


@dataclass
class Scores:
    loss: float  # mean nats per predicted token
    perplexity: float
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def scores_from_totals(nats: float, predicted_tokens: int, text_bytes: int) -> Scores:
    loss = nats / max(predicted_tokens, 1)
    return Scores(loss=loss, perplexity=math.exp(min(loss, 700)), bits_per_byte=nats / math.log(2) / max(text_bytes, 1),
                  tokens=predicted_tokens, bytes=text_bytes)


@torch.no_grad()
def total_nats(model, tokens: np.ndarray, batch_size: int, ignore_id: int | None, dtype=None, max_batches: int | None = None,
               progress=None) -> tuple[float, int]:
    """Sum of next-token losses (nats) over a token stream, and how many tokens were predicted."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, count = 0.0, 0
    for inputs, targets in evaluation_windows(tokens, model.config.context_length, batch_size, ignore_id, max_batches):
        with autocast(device, dtype):
            nats += model.loss(inputs.to(device), targets.to(device), reduction="sum").item()
        count += int((targets != -100).sum())
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return nats, count


def score_text(model, tokenizer, text: str, batch_size: int = 8, dtype=None) -> Scores:
    """Scores of one text, laid out as a document is in training: BOS, text, EOS."""
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], dtype=np.int64)
    nats, count = total_nats(model, ids, batch_size, ignore_id=tokenizer.bos_id, dtype=dtype)
    return scores_from_totals(nats, count, len(text.encode("utf-8")))


def unigram_bits_per_byte(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int, bos_id: int, val_bytes: int) -> float:
    """Bits per byte of the best context-free model (token frequencies of the train split, add-one smoothed).

    The baseline any language model must beat by a wide margin to have learnt more than word counts.
    """
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size).astype(np.float64) + 1.0
    counts[bos_id] = 0  # BOS is never a scored target
    log_probabilities = np.log2(counts / counts.sum(), where=counts > 0, out=np.full(vocab_size, -np.inf))
    targets = np.asarray(val_tokens[1:])
    targets = targets[targets != bos_id]
    return float(-log_probabilities[targets].sum() / max(val_bytes, 1))
