"""What a practitioner watches: throughput, MFU, expert-load statistics, and the TensorBoard writer.

MFU = achieved model FLOPs / peak FLOPs, with model FLOPs from the activated parameters
(`gpt_moe.params.account`) and the peak from a table of accelerators (dense bf16 tensor
throughput) or, on CPU, measured: a bf16 matmul timed on this process's threads.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

# dense bf16 peak FLOP/s per device (vendor data sheets, without sparsity)
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "MI300X": 1307e12,
    "MI250X": 383e12,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():  # longest names first is not needed: table order is specific first
            if key in name:
                return peak, f"table: {name}"
        return float("nan"), f"unknown device {name} (MFU not reported)"
    return measure_matmul_peak(device, dtype), f"measured {dtype} matmul, {torch.get_num_threads()} threads"


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of repeated square matmuls of `size` on this process's threads (best of the runs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def expert_load_stats(load: torch.Tensor) -> dict[str, float]:
    """load: [experts] token counts -> max/mean ratio and coefficient of variation (0 = perfectly even)."""
    load = load.float()
    mean = load.mean().item()
    if mean == 0:
        return {"max_over_mean": 0.0, "cv": 0.0}
    return {"max_over_mean": load.max().item() / mean, "cv": load.std(unbiased=False).item() / mean}


class Throughput:
    """Tokens/s and MFU over the last logging window."""

    def __init__(self, flops_per_token: float, peak_flops_total: float) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def restart(self) -> None:
        """Start a new window without reading (e.g. after an evaluation or a checkpoint save)."""
        self.start, self.tokens = time.perf_counter(), 0

    def read_and_reset(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_sec = self.tokens / elapsed
        mfu = tokens_per_sec * self.flops_per_token / self.peak if self.peak and math.isfinite(self.peak) else float("nan")
        self.start, self.tokens = time.perf_counter(), 0
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}


class NullWriter:
    """The writer for ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def make_writer(log_dir: str, is_rank0: bool):
    """TensorBoard SummaryWriter on rank 0 (imported here: tensorboard is only needed to train)."""
    if not is_rank0:
        return NullWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)
