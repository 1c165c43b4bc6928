"""The numbers behind the logs (`gpt_moe.train.monitor` writes them): throughput and MFU over a window, expert-load
spread, the TensorBoard dashboard layout and writer.

MFU = achieved model FLOPs / peak FLOPs, with model FLOPs from the activated parameters
(`gpt_moe.model.params.account`) and the peak from `gpt_moe.train.hardware.device_peak_flops` (on CPU measured once
per machine and cached, `gpt_moe.train.peak_flops`), summed over the run's devices (GPUs, or CPU hosts).
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def expert_load_stats(load: torch.Tensor) -> dict[str, float]:
    """load: [experts] token counts -> max/mean ratio and coefficient of variation (0 = perfectly even)."""
    load = load.float()
    mean = load.mean().item()
    if mean == 0:
        return {"max_over_mean": 0.0, "cv": 0.0}
    return {"max_over_mean": load.max().item() / mean, "cv": load.std(unbiased=False).item() / mean}


class Throughput:
    """Tokens/s and MFU over the last logging window.

    MFU = tokens/s x model FLOPs per token / the run's total peak FLOP/s. A value above 1 cannot be: the
    peak is wrong (a measurement taken while something else ran, or a wrong --peak-flops). It is then
    reported as NaN with `wrong_peak` set and one warning, never shown as an efficiency."""

    def __init__(self, flops_per_token: float, peak_flops_total: float, peak_source: str = "",
                 warn: bool = True) -> None:
        self.flops_per_token = flops_per_token
        self.peak, self.peak_source = peak_flops_total, peak_source
        self.start = time.perf_counter()
        self.tokens = 0
        self.warned = not warn  # warn=False (ranks other than 0): never

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def restart(self) -> None:
        """Start a new window without reading (e.g. after an evaluation or a checkpoint save)."""
        self.start, self.tokens = time.perf_counter(), 0

    def read_and_reset(self) -> dict[str, float | bool]:
        """{"tokens_per_sec", "mfu" (NaN when the peak is unknown or wrong), "wrong_peak"}."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_sec = self.tokens / elapsed
        known_peak = self.peak and math.isfinite(self.peak)
        mfu = tokens_per_sec * self.flops_per_token / self.peak if known_peak else float("nan")
        self.start, self.tokens = time.perf_counter(), 0
        wrong_peak = mfu > 1
        if wrong_peak and not self.warned:
            log.warning("MFU would be %.0f%%: the peak it divides by (%.4g FLOP/s, %s) is wrong, so MFU is not "
                        "reported; set the hardware's peak with --peak-flops", 100 * mfu, self.peak,
                        self.peak_source or "unknown source")
            self.warned = True
        return {"tokens_per_sec": tokens_per_sec, "mfu": float("nan") if wrong_peak else mfu,
                "wrong_peak": wrong_peak}


def dashboard_layout(moe_layers: list[int]) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout (`SummaryWriter.add_custom_scalars`): the training scalars grouped
    as loss / optimisation / throughput / one group per MoE layer, so the dashboard opens organised."""
    def chart(*tags: str) -> list:
        return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]

    layout = {
        "loss": {"loss": chart("train/loss", "eval/val_loss"),
                 "parts": chart("train/lm_loss", "train/mtp_loss", "train/aux_loss", "train/z_loss")},
        "optimisation": {"learning rate": chart("train/lr"), "gradient norm": chart("train/grad_norm"),
                         "skipped steps": chart("train/skipped_steps")},
        "throughput": {"tokens/s": chart("perf/tokens_per_sec"), "MFU": chart("perf/mfu"),
                       "step time": chart("perf/step_time"), "memory GB": chart("perf/memory_gb")},
    }
    for layer in moe_layers:
        tag = f"experts/layer{layer}_"
        layout[f"experts layer {layer}"] = {
            "load spread": chart(tag + "max_over_mean", tag + "min_over_mean", tag + "cv"),
            "dead experts": chart(tag + "dead"), "router entropy / log E": chart(tag + "entropy"),
            "bias": chart(tag + "bias_range", tag + "bias_drift"), "EP skew": chart(tag + "ep_skew")}
    return layout


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
