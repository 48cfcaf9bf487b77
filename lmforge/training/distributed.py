"""Running the same training loop on one process or many (``torchrun``): DDP or FSDP2.

Under ``torchrun`` the environment names this process's rank; otherwise there is one rank and
every collective below is a no-op. The global batch is the recipe's ``train.batch_size`` whatever the
number of ranks: rank r takes its slice of each micro-batch, so a recipe trains the same model on 1,
2 or 64 processes (up to floating-point summation order) and a checkpoint resumes on any count.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (one small collective for several numbers)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast(self, value):
        """Rank 0's Python value, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global micro-batch."""
        if batch_size % self.world_size:
            raise LmforgeError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({self.world_size}): "
                               "it is the global batch, split evenly across ranks")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_ranks(device_name: str) -> tuple[Ranks, str]:
    """Join the process group when launched by torchrun; returns the ranks and the device name to use."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return Ranks(rank, world_size, local_rank), device_name


def close_ranks(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, ranks: Ranks) -> str:
    """``none`` on one process; ``auto`` means DDP (the fastest when the model fits on each device)."""
    if not ranks.distributed:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module whose ``forward(inputs, targets=...)`` trains: the model itself, DDP or FSDP2-sharded."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each block is its own unit, so only one block's full parameters exist at a time; the root
        # unit holds the embedding, final norm and (tied) head.
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise AssertionError(strategy)


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, accumulate: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on micro-batches that only accumulate."""
    if not accumulate:
        yield
    elif hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def gradient_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP2; the number is the same on every rank."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
