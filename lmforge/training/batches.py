"""Training and validation batches from a token memmap, in an order that is a pure function of the step.

The train split is cut into non-overlapping windows of ``context_length + 1`` tokens. Sample k of the
run is window ``permutation(epoch)[k % n_windows]`` with ``epoch = k // n_windows``, and the permutation
is seeded by (seed, epoch). The data position is therefore just the number of samples consumed, which
is what a checkpoint stores: resuming replays the same samples in the same order, with no duplicates or
skips inside an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmforge.errors import LmforgeError


class TrainBatches:
    def __init__(self, tokens: np.ndarray, context_length: int, seed: int):
        self.tokens = tokens
        self.context_length = context_length
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // context_length
        if self.n_windows < 1:
            raise LmforgeError(
                f"the training split has {len(tokens)} tokens, fewer than one sequence of {context_length + 1}; "
                "add documents or lower model.context_length"
            )
        self._epoch, self._order = -1, None

    def window_ids(self, first_sample: int, count: int) -> list[int]:
        """Window indices of samples first_sample .. first_sample + count - 1."""
        ids = []
        for sample in range(first_sample, first_sample + count):
            epoch, index = divmod(sample, self.n_windows)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n_windows, generator=generator).numpy()
                self._epoch = epoch
            ids.append(int(self._order[index]))
        return ids

    def batch(self, first_sample: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, context_length) int64."""
        span = self.context_length + 1
        rows = [self.tokens[w * self.context_length : w * self.context_length + span] for w in self.window_ids(first_sample, batch_size)]
        block = torch.from_numpy(np.stack(rows).astype(np.int64))
        return block[:, :-1], block[:, 1:]


def evaluation_windows(
    tokens: np.ndarray, context_length: int, batch_size: int, ignore_id: int | None = None, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows covering the whole split once (every token after the first is a target once).

    Targets equal to ``ignore_id`` (the BOS that follows each EOS) are set to -100: predicting the start
    marker after an end marker carries no information about the text and would flatter the score.
    The final partial window comes as its own, shorter batch.
    """
    n_targets = len(tokens) - 1
    full = n_targets // context_length
    starts = [i * context_length for i in range(full)]
    batches = 0
    for first in range(0, len(starts), batch_size):
        if max_batches is not None and batches >= max_batches:
            return
        rows = [tokens[s : s + context_length + 1] for s in starts[first : first + batch_size]]
        yield _split(np.stack(rows), ignore_id)
        batches += 1
    tail = n_targets - full * context_length
    if tail > 0 and (max_batches is None or batches < max_batches):
        yield _split(np.asarray(tokens[full * context_length :])[None, :], ignore_id)


def _split(block: np.ndarray, ignore_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    block = torch.from_numpy(block.astype(np.int64))
    inputs, targets = block[:, :-1], block[:, 1:].clone()
    if ignore_id is not None:
        targets[targets == ignore_id] = -100
    return inputs, targets
