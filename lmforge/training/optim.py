"""The optimizers (AdamW; Muon for the blocks' matrices) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from lmforge.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or Muon for block matrices) where, by default, only matrices inside blocks decay.

    Decaying norm gains pulls them towards zero rather than one, and decaying the (tied) embedding
    shrinks rare tokens' vectors that get few gradient updates; both are common practice to exclude.
    Each group carries ``lr_scale``: its peak learning rate relative to ``train.learning_rate``.
    """
    matrices, others = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.dim() >= 2 and "embed_tokens" not in name and name != "lm_head.weight"
        (matrices if is_matrix else others).append(param)
    others_decay = config.weight_decay if config.decay_norms_and_embeddings else 0.0
    if config.optimizer == "muon":
        muon_scale = config.muon_learning_rate / config.learning_rate
        groups = [
            {"params": matrices, "weight_decay": config.weight_decay, "use_muon": True, "lr_scale": muon_scale},
            {"params": others, "weight_decay": others_decay, "use_muon": False, "lr_scale": 1.0},
        ]
        return Muon(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))
    groups = [
        {"params": matrices, "weight_decay": config.weight_decay, "lr_scale": 1.0},
        {"params": others, "weight_decay": others_decay, "lr_scale": 1.0},
    ]
    # The fused kernel is the fastest path on CUDA; on CPU the foreach path measured as fast and is always available.
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=device.type == "cuda" or None
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix (U V^T of the SVD), by a quintic Newton-Schulz
    iteration whose coefficients trade exactness for speed (singular values land in ~[0.7, 1.2])."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # bf16 is how GPUs run this fast; CPUs without native bf16 run it far slower than fp32.
    x = matrix.bfloat16() if matrix.is_cuda else matrix.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalised by Newton-Schulz) for groups with ``use_muon``; AdamW for the rest.

    Orthogonalising the momentum of a weight matrix equalises the update's singular values, so rare
    directions learn as fast as common ones; embeddings, the head and norm gains are not matrices in
    that sense and keep AdamW. One optimizer object keeps checkpointing and scheduling unchanged.
    """

    def __init__(self, groups, lr: float, betas=(0.9, 0.95), momentum: float = 0.95, eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, betas=betas, momentum=momentum, eps=eps, weight_decay=0.0, use_muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if group["use_muon"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(grad)
                    buffer = state["momentum_buffer"]
                    buffer.lerp_(grad, 1 - group["momentum"])
                    nesterov = grad.lerp(buffer, group["momentum"])
                    update = orthogonalize(nesterov)
                    # Scale so the update's RMS does not shrink for tall matrices.
                    update *= max(1.0, param.size(-2) / param.size(-1)) ** 0.5
                    param.mul_(1 - lr * decay).add_(update, alpha=-lr)
                else:
                    if "exp_avg" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(param)
                        state["exp_avg_sq"] = torch.zeros_like(param)
                    beta1, beta2 = group["betas"]
                    state["step"] += 1
                    step = state["step"].item()
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
                    param.mul_(1 - lr * decay).addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1**step))


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
