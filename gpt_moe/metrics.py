"""What a practitioner watches: throughput, MFU, expert-load statistics, and the TensorBoard writer.

MFU = achieved model FLOPs / peak FLOPs, with model FLOPs from the activated parameters
(`gpt_moe.params.account`) and the peak from `gpt_moe.hardware.device_peak_flops`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


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
        known_peak = self.peak and math.isfinite(self.peak)
        mfu = tokens_per_sec * self.flops_per_token / self.peak if known_peak else float("nan")
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
