"""Intrinsic scores: cross-entropy, perplexity, bits per byte and bits per character, with confidence
intervals.

Bits per byte divides the total information (nats over every predicted token, converted to bits) by
the UTF-8 bytes of the text, so models with different tokenizers can be compared on the same text; bits
per character does the same per Unicode character. Texts longer than the model's context are scored in
sliding windows (``stride`` new tokens per window, the rest of the window as context). The interval
comes from a bootstrap over documents: documents are resampled with replacement and the ratio
(nats over bytes, say) recomputed, so it reflects how much the score depends on which documents happen
to be in the evaluation set.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.evaluation.loglikelihood import count_windows, token_logprobs
from lmforge.training.batches import evaluation_windows
from lmforge.training.device import autocast


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


@dataclass
class DocumentScores:
    """Per-document totals of a scored token stream; all arrays have one entry per document."""

    nats: np.ndarray
    tokens: np.ndarray  # predicted tokens (EOS included, BOS never)
    bytes: np.ndarray  # UTF-8 bytes of the text (special tokens count none)
    chars: np.ndarray  # Unicode characters of the text
    stride: int

    def summary(self, bootstrap_samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
        """Totals and ratios, each with a percentile bootstrap interval over documents."""
        nats, tokens, text_bytes, chars = (float(a.sum()) for a in (self.nats, self.tokens, self.bytes, self.chars))
        scores = {key: float(value) for key, value in _ratios(nats, tokens, text_bytes, chars).items()}
        result = {**scores, "tokens": int(tokens), "bytes": int(text_bytes), "chars": int(chars),
                  "documents": len(self.nats), "stride": self.stride}
        if len(self.nats) >= 2 and bootstrap_samples > 0:
            rng = np.random.default_rng(seed)
            n = len(self.nats)
            totals = np.stack([self.nats, self.tokens, self.bytes, self.chars])  # (4, documents)
            resampled_totals = []
            # Each row of a draw counts how often each document is picked in one resample of n documents;
            # drawn a hundred resamples at a time so memory stays small with many documents.
            for start in range(0, bootstrap_samples, 100):
                draws = rng.multinomial(n, np.full(n, 1.0 / n), size=min(100, bootstrap_samples - start))
                resampled_totals.append(draws @ totals.T)  # (resamples, 4)
            resampled = _ratios(*np.concatenate(resampled_totals).T)
            tail = (1 - confidence) / 2 * 100
            result["confidence"] = confidence
            result["bootstrap_samples"] = bootstrap_samples
            result["interval"] = {key: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
                                  for key, values in resampled.items()}
        return result


def _ratios(nats, tokens, text_bytes, chars) -> dict:
    """The scores from totals; works on scalars and, elementwise, on arrays of bootstrap totals."""
    nats = np.asarray(nats, dtype=np.float64)
    loss = nats / np.maximum(tokens, 1)
    bits = nats / math.log(2)
    return {"loss": loss, "perplexity": np.exp(np.minimum(loss, 700)), "bits_per_byte": bits / np.maximum(text_bytes, 1),
            "bits_per_char": bits / np.maximum(chars, 1)}


@functools.lru_cache(maxsize=4)
def token_text_lengths(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes, characters) each token id contributes to decoded text; special tokens contribute none.

    A character is counted at its first byte, so a character split across tokens counts once. Cached per
    tokenizer: it walks the whole vocabulary, and every scored text needs it.
    """
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    n_bytes = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    n_chars = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for token_id in range(tokenizer.vocab_size):
        if token_id in special:
            continue
        raw = tokenizer.token_bytes(token_id)
        n_bytes[token_id] = len(raw)
        n_chars[token_id] = sum(1 for byte in raw if byte & 0xC0 != 0x80)  # not a UTF-8 continuation byte
    n_bytes.setflags(write=False)  # shared through the cache
    n_chars.setflags(write=False)
    return n_bytes, n_chars


def score_documents(model, tokenizer, ids: np.ndarray, document_of_token: np.ndarray | None = None, stride: int | None = None,
                    batch_size: int = 16, dtype=None, progress: bool = False, description: str = "eval") -> DocumentScores:
    """Score a token stream laid out as training lays it out (``[bos] doc [eos] [bos] doc [eos] ...``).

    Every token after the first is predicted once (sliding windows), except the BOS that starts each
    document: predicting it after an EOS says nothing about the text. Each prediction is charged to the
    document of its target token: by default a new document starts at each BOS; ``document_of_token``
    can assign tokens to other units (say paragraphs of one long text).
    """
    import sys

    from tqdm import tqdm

    ids = np.asarray(ids, dtype=np.int64)
    context = model.config.context_length
    stride = stride or context
    with tqdm(total=count_windows(len(ids), context, stride), desc=description, disable=not progress, file=sys.stderr, unit="window") as bar:
        logprobs = token_logprobs(model, ids, stride, batch_size, dtype, progress=bar).numpy()
    targets = ids[1:]
    if document_of_token is None:
        document_of_token = np.cumsum(ids == tokenizer.bos_id) - 1
        document_of_token = np.maximum(document_of_token, 0)
    documents = np.asarray(document_of_token)[1:]
    counted = targets != tokenizer.bos_id
    n_documents = int(np.asarray(document_of_token).max()) + 1 if len(ids) else 0
    n_bytes, n_chars = token_text_lengths(tokenizer)

    def per_document(weights):
        return np.bincount(documents[counted], weights=np.asarray(weights, dtype=np.float64)[counted], minlength=n_documents)

    tokens = per_document(np.ones(len(targets)))
    scored = tokens > 0  # a unit with no predicted token (an empty paragraph) is not a document
    return DocumentScores(nats=per_document(-logprobs)[scored], tokens=tokens[scored], bytes=per_document(n_bytes[targets])[scored],
                          chars=per_document(n_chars[targets])[scored], stride=stride)


def score_text_paragraphs(model, tokenizer, text: str, stride: int | None = None, batch_size: int = 16, dtype=None) -> DocumentScores:
    """One text scored as one document (``[bos] text [eos]``), its predictions grouped by paragraph.

    The paragraphs (separated by blank lines) are the units of the bootstrap; the text keeps its full
    context across them.
    """
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], dtype=np.int64)
    n_bytes, _ = token_text_lengths(tokenizer)
    token_starts = np.concatenate([[0], np.cumsum(n_bytes[ids])[:-1]])  # byte offset where each token begins
    # A paragraph ends after a run of blank lines (LF or CRLF, blank meaning at most spaces and tabs).
    boundaries = [match.end() for match in re.finditer(rb"\r?\n(?:[ \t]*\r?\n)+", text.encode("utf-8"))]
    paragraph = np.searchsorted(np.asarray(boundaries, dtype=np.int64), token_starts, side="right")
    paragraph[-1] = paragraph[-2] if len(ids) > 1 else 0  # the EOS belongs to the last paragraph
    return score_documents(model, tokenizer, ids, document_of_token=paragraph, stride=stride, batch_size=batch_size, dtype=dtype)


def score_document_texts(model, tokenizer, texts: list[str], stride: int | None = None, batch_size: int = 16, dtype=None,
                         progress: bool = False) -> DocumentScores:
    """Several documents laid out one after another as in training, each its own bootstrap unit."""
    ids = [token for text in texts for token in (tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id)]
    return score_documents(model, tokenizer, np.asarray(ids, dtype=np.int64), stride=stride, batch_size=batch_size, dtype=dtype,
                           progress=progress)
