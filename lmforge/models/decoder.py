"""A decoder-only transformer with the Llama architecture, read top to bottom.

RMSNorm -> rotary positions -> grouped-query attention (SDPA) -> SwiGLU MLP -> Block -> Decoder.
Parameter names are the Hugging Face `LlamaForCausalLM` names (``model.layers.0.self_attn.q_proj.weight``
...), so exporting is saving the state dict next to a Llama ``config.json``.

The model knows nothing of training, distribution or serving. For cached decoding it accepts any
object with an ``offset`` (tokens already cached) and ``update(layer_index, k, v) -> (k, v)`` (see
``lmforge.inference.kv_cache``). A cache whose rows are at different positions (the engine's slot cache)
also has ``positions`` (B, T), each token's position, and ``attention_mask`` (B, 1, T, S), which cached
keys each query may see; the model uses them instead of ``offset`` when they are not None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class DecoderConfig:
    vocab_size: int
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_hidden: int = 704
    context_length: int = 256
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    qk_norm: bool = False
    mlp: str = "swiglu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_recipe(cls, model_section, vocab_size: int) -> "DecoderConfig":
        """Build from the recipe's ``model`` section, filling the derived defaults."""
        values = model_section.model_dump()
        values["n_kv_heads"] = values["n_kv_heads"] or values["n_heads"]
        if values["ffn_hidden"] is None:
            # SwiGLU has three matrices, so 8/3 * d keeps the MLP's parameters equal to a 4*d two-matrix MLP.
            width = 8 * values["d_model"] / 3 if values["mlp"] == "swiglu" else 4 * values["d_model"]
            values["ffn_hidden"] = 64 * math.ceil(width / 64)
        return cls(vocab_size=vocab_size, **values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does, so bf16 activations do not lose the variance estimate.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (length, head_dim), in the half-split layout Hugging Face Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by per-position angles; cos/sin are (T, head_dim) or per row (B, 1, T, head_dim)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        if config.qk_norm:
            # Normalising each head's queries and keys bounds the attention logits, which lets higher
            # learning rates train stably (names as in Qwen3, which has the same layers).
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        offset, mask = 0, None
        if cache is not None:
            offset, mask = cache.offset, getattr(cache, "attention_mask", None)
            k, v = cache.update(self.layer_index, k, v)  # now (B, KV, offset + T, hd), or (B, KV, S, hd) with a mask
        if self.n_kv_heads != self.n_heads:
            # Expanding K/V is as fast as SDPA's enable_gqa on CPU and works on every torch >= 2.4.
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)

        if mask is not None:
            # Rows at different positions: the cache says which of its keys each query may see.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif offset == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        elif length == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # A chunk appended after cached tokens: query i sees every cached key and the chunk up to i.
            key_positions = torch.arange(k.shape[2], device=x.device)
            query_positions = offset + torch.arange(length, device=x.device)
            mask = key_positions[None, :] <= query_positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU (Llama) or squared ReLU (Primer; two matrices, cheaper per parameter)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Causal language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
                norm=RMSNorm(config.d_model, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rotary_tables(config.head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Training switches, not part of the architecture (see TrainConfig).
        self.activation_checkpointing = False
        self.loss_chunk_tokens: int | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if name.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight")) or name == "model.norm.weight":
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Residual outputs scaled by depth (GPT-2), so the residual stream's variance does not grow with layers.
                nn.init.normal_(param, std=self.config.init_std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, std=self.config.init_std)

    def forward(self, input_ids: torch.Tensor, cache=None, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits, or with ``targets`` the next-token cross-entropy (targets equal to -100 are ignored).

        Training calls the module with targets so that wrappers hooking ``__call__`` (DDP, FSDP2) see it.
        """
        length = input_ids.shape[1]
        positions = getattr(cache, "positions", None)
        if positions is not None:  # (B, T): rows at different positions; the cache keeps them inside the context
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)
        else:
            offset = cache.offset if cache is not None else 0
            if offset + length > self.config.context_length:
                raise ValueError(f"sequence of {offset + length} tokens exceeds the context length {self.config.context_length}")
            cos = self.rope_cos[offset : offset + length]
            sin = self.rope_sin[offset : offset + length]
        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute:
                # Keep only each block's input; its activations are recomputed in backward (~1/3 more compute).
                x = checkpoint(block, x, cos, sin, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(length)
        hidden = self.model.norm(x)
        if targets is None:
            return self.lm_head(hidden)
        if self.loss_chunk_tokens and self.training and torch.is_grad_enabled() and targets.numel() > self.loss_chunk_tokens:
            return self._chunked_loss(hidden.flatten(0, 1), targets.flatten(), reduction)
        logits = self.lm_head(hidden)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)

    def _chunked_loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """The same cross-entropy, a chunk of tokens at a time, each chunk's logits recomputed in backward.

        With a large vocabulary the (tokens x vocab) logits and their gradient dominate memory
        (32 x 1024 tokens x 50k vocab in fp32 is 6.6 GB); chunked, one chunk's logits exist at a time,
        for a second pass through the output layer.
        """
        total = hidden.new_zeros((), dtype=torch.float32)
        for hidden_chunk, target_chunk in zip(hidden.split(self.loss_chunk_tokens), targets.split(self.loss_chunk_tokens)):
            total = total + checkpoint(self._loss_sum, hidden_chunk, target_chunk, use_reentrant=False)
        if reduction == "sum":
            return total
        return total / (targets != -100).sum()

    def _loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(hidden).float(), targets, ignore_index=-100, reduction="sum")

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of next-token prediction; targets equal to -100 are ignored."""
        return self(input_ids, targets=targets, reduction=reduction)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if not include_embeddings:
            total -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, sequence_length: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N plus attention scores."""
        cfg = self.config
        length = sequence_length or cfg.context_length
        matmul_params = self.num_parameters(include_embeddings=False) + cfg.vocab_size * cfg.d_model  # the head is a matmul
        attention = 12 * cfg.n_layers * cfg.d_model * length
        return 6 * matmul_params + attention
