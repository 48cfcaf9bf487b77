"""Pre-allocated key/value caches: decoding writes into fixed buffers instead of concatenating.

``KVCache`` holds a batch of sequences that all have the same length (``generate``-style decoding,
tests). ``SlotKVCache`` is the inference engine's: one row ("slot") per running request, each at its
own position, so requests can join and leave a running batch between steps.
"""

from __future__ import annotations

import torch


class KVCache:
    # Every row is at the same position (``offset``), so the model needs neither per-row positions nor a mask.
    positions = None
    attention_mask = None

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_length: int, head_dim: int, dtype, device):
        shape = (n_layers, batch_size, n_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.offset = 0  # tokens already stored (the same for every layer between forward calls)

    @classmethod
    def for_model(cls, model, batch_size: int, max_length: int | None = None) -> "KVCache":
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_length or cfg.context_length, cfg.head_dim, weight.dtype, weight.device)

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, KV, T, hd) keys/values; return everything cached for the layer so far."""
        end = self.offset + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} tokens > {self.max_length}")
        self.keys[layer_index, :, :, self.offset : end] = k
        self.values[layer_index, :, :, self.offset : end] = v
        return self.keys[layer_index, :, :, :end], self.values[layer_index, :, :, :end]

    def advance(self, length: int) -> None:
        self.offset += length

    def reset(self) -> None:
        self.offset = 0


class SlotKVCache:
    """Keys/values of up to ``slots`` sequences at different lengths, allocated once.

    Keys and values share one buffer, (layers, slots, 2 * kv_heads, max_length, head_dim), keys first, so
    a decode step writes both with one operation; ``keys`` and ``values`` are views of its halves.
    The engine keeps its running requests in
    slots 0..n-1 (``move`` shifts a request down into a freed slot) so a decode step works on a prefix
    of the buffers, a view, and nothing is copied or allocated per step except the small mask.

    Use: ``prefill(slot)`` gives a cache for one prompt written into one slot (the model sees an ordinary
    cache at offset 0); ``begin_decode(rows, width)`` then a model call with one token per row appends
    each row's token at that row's own length.
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_length: int, head_dim: int, dtype, device):
        # Zeros, not empty: masked-out positions still enter attention as values, and 0 * NaN would be NaN.
        self.keys_and_values = torch.zeros((n_layers, slots, 2 * n_kv_heads, max_length, head_dim), dtype=dtype, device=device)
        self.keys = self.keys_and_values[:, :, :n_kv_heads]
        self.values = self.keys_and_values[:, :, n_kv_heads:]
        self.max_length = max_length
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens cached per slot
        self.key_positions = torch.arange(max_length, device=device)
        self.slot_index = torch.arange(slots, device=device)
        self.offset = 0  # unused when positions/attention_mask are set; kept for the model's cache protocol
        self.positions: torch.Tensor | None = None  # (rows, 1) during a decode step
        self.attention_mask: torch.Tensor | None = None  # (rows, 1, 1, width) during a decode step
        self._rows = 0
        self._width = 0

    @classmethod
    def for_model(cls, model, slots: int) -> "SlotKVCache":
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.n_layers, slots, cfg.n_kv_heads, cfg.context_length, cfg.head_dim, weight.dtype, weight.device)

    def prefill(self, slot: int) -> "_SlotPrefill":
        """A cache for the model call that processes a whole prompt into ``slot`` (replacing what it held)."""
        return _SlotPrefill(self, slot)

    def begin_decode(self, rows: int, width: int) -> None:
        """Prepare a model call on slots 0..rows-1, one new token each; ``width`` > every row's length."""
        if width > self.max_length:
            raise ValueError(f"KV cache full: {width} tokens > {self.max_length}")
        self._rows, self._width = rows, width
        lengths = self.lengths[:rows]
        self.positions = lengths[:, None]
        # A query at position p sees the keys at positions 0..p; later ones are stale or zeros.
        self.attention_mask = (self.key_positions[:width] <= self.positions)[:, None, None, :]

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's (rows, KV, 1, hd) key/value at its own position; return (rows, KV, width, hd) views."""
        rows, lengths = self.slot_index[: self._rows], self.lengths[: self._rows]
        keys, values = self.keys[layer_index], self.values[layer_index]
        keys[rows, :, lengths] = k[:, :, 0]
        values[rows, :, lengths] = v[:, :, 0]
        return keys[: self._rows, :, : self._width], values[: self._rows, :, : self._width]

    def advance(self, length: int) -> None:
        self.lengths[: self._rows] += length

    def move(self, source: int, destination: int, length: int) -> None:
        """Copy slot ``source``'s first ``length`` positions into slot ``destination``."""
        self.keys_and_values[:, destination, :, :length] = self.keys_and_values[:, source, :, :length]
        self.lengths[destination] = length


class _SlotPrefill:
    """The cache a prompt's forward pass sees: an empty single-row cache backed by one slot's buffers."""

    positions = None
    attention_mask = None
    offset = 0

    def __init__(self, cache: SlotKVCache, slot: int):
        self.cache, self.slot = cache, slot

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = k.shape[2]
        if length > self.cache.max_length:
            raise ValueError(f"KV cache full: {length} tokens > {self.cache.max_length}")
        self.cache.keys[layer_index, self.slot, :, :length] = k[0]
        self.cache.values[layer_index, self.slot, :, :length] = v[0]
        return k, v  # offset 0: the prompt attends only to itself, causally

    def advance(self, length: int) -> None:
        self.cache.lengths[self.slot] = length
