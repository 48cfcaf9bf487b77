"""Low-rank adapters (LoRA, Hu et al. 2021) and layer freezing: fine-tuning that fits small machines.

LoRA leaves a linear layer's weight W frozen and learns a low-rank change to it: the layer computes
``x W^T + (alpha / r) x A^T B^T`` with A (r x in) and B (out x r). B starts at zero, so the wrapped
model starts out computing exactly what the base model does. Only A and B train (and keep optimizer
state): for a rank-8 adapter on a 192-wide model's projections, a few percent of the parameters.

The wrapped module keeps the base weight under its own name (``...q_proj.weight``), so a wrapped
model's state dict is the base one plus ``...q_proj.lora_A.weight`` / ``lora_B.weight``. Saved apart,
the adapter uses PEFT's names (``base_model.model.<module>.lora_A.weight``) and an
``adapter_config.json`` with PEFT's keys; merged, ``W + (alpha / r) B A`` replaces W and the model is a
plain decoder again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge.config import LORA_TARGETABLE
from lmforge.errors import LmforgeError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
TARGETABLE = LORA_TARGETABLE  # the decoder's projections, by their Hugging Face names


class LoRALinear(nn.Module):
    """A frozen bias-free ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=base.weight.device)
        # PEFT's initialisation: A as nn.Linear's default, B zero, so the update starts at exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def freeze_layers(model, count: int) -> None:
    """Freeze the token embedding and the first ``count`` blocks (their weights never change)."""
    if count > model.config.n_layers:
        raise LmforgeError(f"finetune.freeze_layers is {count} but the model has {model.config.n_layers} layers")
    model.model.embed_tokens.weight.requires_grad_(False)  # a tied output head is the same tensor
    for block in model.model.layers[:count]:
        for param in block.parameters():
            param.requires_grad_(False)


def apply_lora(model, rank: int, alpha: float, targets: list[str], skip_layers: int = 0) -> list[str]:
    """Freeze every weight of ``model`` and wrap the ``targets`` projections of blocks ``skip_layers`` and
    up with adapters, in place; returns the wrapped modules' names."""
    unknown = sorted(set(targets) - set(TARGETABLE))
    if unknown:
        raise LmforgeError(f"finetune.lora_targets: unknown module {unknown[0]!r}; the decoder's projections are {', '.join(TARGETABLE)}")
    if skip_layers > model.config.n_layers:
        raise LmforgeError(f"finetune.freeze_layers is {skip_layers} but the model has {model.config.n_layers} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = []
    for layer_index in range(skip_layers, model.config.n_layers):
        prefix = f"model.layers.{layer_index}"
        for parent_name in ("self_attn", "mlp"):
            parent = model.get_submodule(f"{prefix}.{parent_name}")
            for target in targets:
                base = getattr(parent, target, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, target, LoRALinear(base, rank, alpha))
                    wrapped.append(f"{prefix}.{parent_name}.{target}")
    if not wrapped:
        raise LmforgeError(f"finetune.lora_targets {targets} match no projection of this model's blocks (a relu2 MLP has no gate_proj)")
    return wrapped


def merge_lora(model) -> None:
    """Fold every adapter into its weight and put plain ``nn.Linear`` layers back, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attribute = name.rpartition(".")
            merged = nn.Linear(module.in_features, module.out_features, bias=False, device=module.weight.device)
            with torch.no_grad():
                merged.weight.copy_(module.merged_weight())
            setattr(model.get_submodule(parent_name), attribute, merged)


def split_state(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapter weights with PEFT's names) from a wrapped model's state dict."""
    base, adapter = {}, {}
    for name, tensor in weights.items():
        if ".lora_A." in name or ".lora_B." in name:
            adapter[PEFT_PREFIX + name] = tensor
        else:
            base[name] = tensor
    return base, adapter


def merged_state(weights: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A wrapped model's state dict with each adapter folded into its weight (the plain decoder's names)."""
    base, adapter = split_state(weights)
    return {**base, **_deltas_added(base, adapter, scaling)}


def _deltas_added(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    merged = {}
    for name, a in adapter.items():
        if ".lora_A." not in name:
            continue
        module = name.removeprefix(PEFT_PREFIX).rsplit(".lora_A.", 1)[0]
        b = adapter.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        weight = base.get(f"{module}.weight")
        if b is None or weight is None:
            raise LmforgeError(f"adapter tensor {name} has no matching lora_B or base weight `{module}.weight`")
        merged[f"{module}.weight"] = weight + scaling * (b.to(weight.dtype) @ a.to(weight.dtype))
    return merged


def adapter_config(rank: int, alpha: float, targets: list[str], wrapped: list[str], merged: bool, base_checkpoint: str) -> dict:
    """PEFT's adapter_config.json keys, plus what lmforge needs: whether the weights already hold it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(targets), "fan_in_fan_out": False, "base_model_name_or_path": base_checkpoint,
            "lmforge": {"merged_into_weights": merged, "modules": wrapped}}


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(config, PEFT-named tensors) of the adapter saved in ``folder``, or None when it has none."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).exists():
        return None
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        rank = int(config["r"])
        float(config["lora_alpha"])  # present and a number, or the adapter cannot be applied
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(f"{folder / ADAPTER_CONFIG} is not a valid adapter config: {exc}") from None
    if rank < 1:
        raise LmforgeError(f"{folder / ADAPTER_CONFIG}: r must be at least 1 (got {rank})")
    return config, load_file(str(folder / ADAPTER_WEIGHTS))


def apply_saved_adapter(model, folder: Path) -> bool:
    """Add the adapter saved in ``folder`` to the model's weights, unless they already hold it; True if added.

    This is how ``load_model`` serves a checkpoint whose adapter was kept apart from its base weights.
    """
    found = read_adapter(folder)
    if found is None:
        return False
    config, adapter = found
    if config.get("lmforge", {}).get("merged_into_weights"):
        return False
    weights = dict(model.state_dict())
    merged = _deltas_added(weights, adapter, float(config["lora_alpha"]) / int(config["r"]))
    with torch.no_grad():
        for name, tensor in merged.items():
            model.get_parameter(name).copy_(tensor)
    return True
