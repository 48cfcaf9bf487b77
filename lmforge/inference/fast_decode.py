"""The engine's decode step: one new token for each of many sequences, in as few tensor operations as possible.

Decoding one token at batch 1 is ~3M multiply-adds for the default model, so on a CPU (and on a GPU
without graphs) its time is mostly the number of operations dispatched, not arithmetic.
``Decoder.forward`` spends ~45 per layer (module calls, separate q/k/v projections, rotary with
slices and a concatenation, norms with their own multiply). ``FastDecodeStep`` computes the same
function with ~14, from weights rearranged once when the engine starts:

- q, k and v come out of one matrix multiply, and rotary is applied to q and k together with one
  ``roll`` (rotate_half's sign is folded into the sin table);
- each RMSNorm's weight is folded into the matrix that follows it (``(w * n) @ W.T == n @ (W * w).T``);
- residual additions are fused into the output projections (``addmm``);
- keys and values are written into the slot cache with one ``index_put_``, and one additive mask
  per step serves every layer.

It reads the model's weights (it keeps the fused copies: rebuild it if the weights change) and the
model keeps the one definition of the architecture: ``tests/test_engine.py`` checks this step's logits
against ``Decoder.forward`` for every architecture option (GQA, SwiGLU / squared ReLU, QK-norm, tied
or untied embeddings). ``prefill`` runs a prompt through the same weights and computes only the
last position's logits (the only ones generation needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.inference.kv_cache import SlotKVCache


class FastDecodeStep:
    """Next-token logits for slots 0..B-1 of a ``SlotKVCache``, each fed one token at its own position."""

    def __init__(self, model, cache: SlotKVCache):
        config = model.config
        self.cache = cache
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.eps = config.norm_eps
        self.gated = config.mlp == "swiglu"
        self.qk_norm = config.qk_norm
        # RMSNorm runs in float32 in the model (for bf16 activations); the same here.
        self.upcast = model.model.embed_tokens.weight.dtype != torch.float32
        heads, kv_heads, hd = self.n_heads, self.n_kv_heads, self.head_dim
        with torch.no_grad():
            self.embedding = model.model.embed_tokens.weight.detach()
            # rotate_half(x) == roll(x, half) with the first half negated: the sign goes into the sin table.
            half = hd // 2
            signed_sin = torch.cat((-model.rope_sin[:, :half], model.rope_sin[:, half:]), dim=1)
            # cos and sin of every position side by side: one gather per step gives both.
            self.rotary = torch.stack((model.rope_cos, signed_sin), dim=1).to(self.embedding.dtype)  # (S, 2, hd)
            self.layers = []
            for block in model.model.layers:
                attention, mlp = block.self_attn, block.mlp
                qkv = torch.cat((attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight))
                qk_norm = None
                if self.qk_norm:  # (H + KV, hd): each head's norm weight, q heads then k heads
                    qk_norm = torch.cat((attention.q_norm.weight.expand(heads, hd), attention.k_norm.weight.expand(kv_heads, hd)))
                up = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)) if self.gated else mlp.up_proj.weight
                self.layers.append(dict(
                    qkv=(qkv * block.input_layernorm.weight).t().contiguous(),  # (d, (H + 2 KV) * hd)
                    qk_norm=qk_norm,
                    out=attention.o_proj.weight.t().contiguous(),
                    up=(up * block.post_attention_layernorm.weight).t().contiguous(),
                    down=mlp.down_proj.weight.t().contiguous(),
                ))
            self.head = (model.lm_head.weight * model.model.norm.weight).t().contiguous()  # (d, V)
            # The same, (V, d): for 4 rows or more F.linear with it is ~15% faster on CPU (the output
            # layer is the largest multiply), for fewer ~15% slower. Both are kept (a few MB).
            self.head_rows = self.head.t().contiguous()
        self._key_value_index = torch.arange(2 * kv_heads, device=self.embedding.device)[None, :]
        self._stored = list(cache.keys_and_values)  # per layer (slots, 2 KV, S, hd)
        self._views_by_rows: dict[int, tuple] = {}
        self._compiled_single = None  # see compile_single_stream

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast:
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def _project(self, x: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(N, d) hidden states -> (N, H + 2 KV, hd): rotated queries, rotated keys, values, in that order."""
        heads, kv_heads, hd = self.n_heads, self.n_kv_heads, self.head_dim
        projected = (self._norm(x) @ layer["qkv"]).view(x.shape[0], heads + 2 * kv_heads, hd)
        qk = projected[:, : heads + kv_heads]
        if layer["qk_norm"] is not None:
            qk.copy_(self._norm(qk) * layer["qk_norm"])
        # Rotary for q and k at once, written in place so keys and values stay side by side for the cache.
        torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin, out=qk)
        return projected

    def _finish_layer(self, x: torch.Tensor, attended: torch.Tensor, layer: dict) -> torch.Tensor:
        """The residual stream after the attention output (N, H * hd) and the MLP."""
        x = torch.addmm(x, attended, layer["out"])
        hidden = self._norm(x) @ layer["up"]
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate).mul_(up)
        else:
            hidden = hidden.relu_().square_()
        return torch.addmm(x, hidden, layer["down"])

    def __call__(self, tokens: torch.Tensor, rows: int, width: int, same_length: bool = False) -> torch.Tensor:
        """Logits (rows, V) after feeding ``tokens`` (rows,) to slots 0..rows-1; ``width`` > every slot's length.

        ``same_length``: every slot holds width - 1 tokens, so attention needs no mask (always true for one row).
        """
        lengths, write_at = self._views(rows)
        if rows == 1 and self._compiled_single is not None:  # fixed shapes: attention spans the context, masked
            logits = self._compiled_single(tokens, lengths, write_at, self.cache.max_length, False)
        else:
            logits = self._decode(tokens, lengths, write_at, width, same_length)
        lengths.add_(1)
        return logits

    def _decode(self, tokens: torch.Tensor, lengths: torch.Tensor, write_at: tuple, width: int, same_length: bool) -> torch.Tensor:
        rows = tokens.shape[0]
        heads, kv_heads, hd = self.n_heads, self.n_kv_heads, self.head_dim
        angles = torch.index_select(self.rotary, 0, lengths)  # (B, 2, hd)
        cos, sin = angles[:, :1], angles[:, 1:]
        mask = None
        if not same_length:  # a query at position p sees cached keys 0..p: an additive mask for all layers
            mask = torch.zeros((rows, 1, 1, width), dtype=self.embedding.dtype, device=tokens.device)
            mask.view(rows, width).masked_fill_(self.cache.key_positions[:width] > write_at[2], float("-inf"))
        x = F.embedding(tokens, self.embedding)  # (B, d)
        for layer, stored in zip(self.layers, self._stored):
            projected = self._project(x, layer, cos, sin)
            stored.index_put_(write_at, projected[:, heads:])
            # Each key/value head serves heads // kv_heads query heads: they are that head's queries.
            queries = projected[:, :heads].view(rows, kv_heads, heads // kv_heads, hd)
            keys, values = stored[:rows, :kv_heads, :width], stored[:rows, kv_heads:, :width]
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
            x = self._finish_layer(x, attended.reshape(rows, heads * hd), layer)
        return F.linear(self._norm(x), self.head_rows) if rows >= 4 else self._norm(x) @ self.head

    def _views(self, rows: int) -> tuple[torch.Tensor, tuple]:
        """Slot lengths (rows,) and the (slot, head, position) index of each new key/value, as views of the
        cache's ``lengths``: made once per batch size, they follow its in-place updates."""
        if rows not in self._views_by_rows:
            lengths = self.cache.lengths[:rows]
            self._views_by_rows[rows] = lengths, (self.cache.slot_index[:rows, None], self._key_value_index, lengths[:, None])
        return self._views_by_rows[rows]

    def prefill(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Process a whole prompt (T,) into ``slot`` (replacing what it held); the last position's logits (1, V)."""
        cache = self.cache
        heads, kv_heads, hd = self.n_heads, self.n_kv_heads, self.head_dim
        length = tokens.shape[0]
        if length > cache.max_length:
            raise ValueError(f"KV cache full: {length} tokens > {cache.max_length}")
        angles = self.rotary[:length]  # positions 0..T-1
        cos, sin = angles[:, :1], angles[:, 1:]
        x = F.embedding(tokens, self.embedding)  # (T, d)
        for index, layer in enumerate(self.layers):
            projected = self._project(x, layer, cos, sin).transpose(0, 1)  # (H + 2 KV, T, hd)
            cache.keys_and_values[index, slot, :, :length] = projected[heads:]
            queries, keys, values = projected.split((heads, kv_heads, kv_heads))
            if kv_heads != heads:
                keys, values = keys.repeat_interleave(heads // kv_heads, 0), values.repeat_interleave(heads // kv_heads, 0)
            attended = F.scaled_dot_product_attention(queries[None], keys[None], values[None], is_causal=True)[0]
            x = self._finish_layer(x, attended.transpose(0, 1).reshape(length, heads * hd), layer)
        cache.lengths[slot] = length
        return self._norm(x[-1:]) @ self.head

    def compile(self) -> None:
        """Compile the step with CUDA graphs (``torch.compile(mode="reduce-overhead")``); for CUDA devices.

        Callers must then pass ``width`` = the context length and ``same_length=False``, so that shapes
        depend only on the batch size (one graph per batch size). Unmeasured: no GPU was available
        when this was written (see BENCHMARKS.md).
        """
        self._decode = torch.compile(self._decode, mode="reduce-overhead", dynamic=False)

    def compile_single_stream(self) -> str | None:
        """Compile the batch-1 step with inductor (CPU); None when it worked, else why not (the step stays eager).

        At one stream the eager step is mostly per-operation dispatch (~57 small operations); inductor
        fuses them (~25% less CPU time per token on a 2-core EPYC, see BENCHMARKS.md). Only batch 1:
        compiled steps were slower than eager ones at batch 8, and each batch size costs seconds of
        compilation. Needs a C++ compiler (gcc) at run time; compiles now, a few seconds, and checks
        the compiled logits against the eager ones. Slot 0 must be free: the check writes into it.
        """
        if self.cache.max_length < 2:
            return "the context is too short to compile for"
        try:
            compiled = torch.compile(self._decode, dynamic=False, options={"freezing": True, "cpp_wrapper": True})
            with torch.inference_mode():
                lengths, write_at = self._views(1)
                tokens = torch.zeros(1, dtype=torch.long, device=self.embedding.device)
                saved = lengths.clone()
                lengths.fill_(1)  # position 1, after a (garbage) position 0: exercises the mask
                eager = self._decode(tokens, lengths, write_at, self.cache.max_length, False)
                result = compiled(tokens, lengths, write_at, self.cache.max_length, False)
                lengths.copy_(saved)
            difference = (result - eager).abs().max().item()
            if not difference <= 1e-4 * max(eager.abs().max().item(), 1.0):
                return f"the compiled step's logits differ from the eager step's by {difference:.2g}"
        except Exception as error:  # no C++ compiler, an inductor bug: the eager step works everywhere
            return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self._compiled_single = compiled
        return None
