"""Peak matmul throughput, the denominator of model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time
from functools import lru_cache

import torch

# Dense (not 2:4 sparse) peak tensor-core FLOP/s from the vendors' datasheets: bf16, and tf32 for fp32 work.
GPU_PEAKS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the PCIe card is ~25% lower
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """FLOP/s the device can reach on large matmuls at the training precision; None when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32) in GPU_PEAKS.items():
            if key in name:
                return bf16 if dtype in (torch.bfloat16, torch.float16) else tf32
        return None
    if device.type == "cpu":
        return measured_cpu_peak(dtype or torch.float32)
    return None


@lru_cache(maxsize=None)
def measured_cpu_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-N FLOP/s of an (n, n) @ (n, n).T product, the layout nn.Linear uses (about 0.1 s)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b.T  # the first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best
