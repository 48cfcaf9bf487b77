"""AdamW with decoupled weight decay on the right parameters, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from lmforge.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW where, by default, only matrices inside blocks decay.

    Decaying norm gains pulls them towards zero rather than one, and decaying the (tied) embedding
    shrinks rare tokens' vectors that get few gradient updates; both are common practice to exclude.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "embed_tokens" not in name and name != "lm_head.weight"
        (decay if is_matrix or config.decay_norms_and_embeddings else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel is the fastest path on CUDA; on CPU the foreach path measured as fast and is always available.
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=device.type == "cuda" or None
    )


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) when ``progress`` (0..1) of the budget is spent.

    Progress rather than step count drives the decay so a run bounded by tokens or minutes gets a
    complete schedule too.
    """
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if config.schedule == "constant":
        return peak
    if config.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = 1.0 - config.decay_fraction
    if progress <= decay_start:
        return peak
    return peak - (peak - floor) * (progress - decay_start) / config.decay_fraction
