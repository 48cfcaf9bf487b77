"""A pre-allocated key/value cache: decoding writes into fixed buffers instead of concatenating."""

from __future__ import annotations

import torch


class KVCache:
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
