"""The peak that MFU divides by: reproducible across fresh processes, cached per machine, and an MFU above 100%
reported as a wrong peak rather than shown."""

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_moe.train.hardware import device_peak_flops
from gpt_moe.train.metrics import Throughput
from gpt_moe.train.peak_flops import CACHE_ENV, cache_path, machine_key

REPO = Path(__file__).resolve().parent.parent
THREADS = min(2, os.cpu_count() or 1)
MEASURE = ("import torch; from gpt_moe.train.peak_flops import measure_matmul_peak; "
           f"print(measure_matmul_peak(torch.float32, {THREADS})[0])")


def test_two_fresh_processes_measure_the_same_peak():
    """fp32 is native on every CPU: 1024^3 matmuls, warm-up excluded, the best batch over a second. Two
    interpreters (cold caches, their own first matmul) agree within 20%. Other processes that keep every core
    busy for the whole second take a share no measurement can recover (seen on a shared 2-core machine: 77-128
    GFLOP/s against 276-288 when quiet), which is why a run reads the figure from the cache. The suite runs its
    tests one at a time, so here the two measurements have the machine to themselves."""
    peaks = [float(subprocess.run([sys.executable, "-c", MEASURE], cwd=REPO, capture_output=True, text=True,
                                  check=True, timeout=120).stdout) for _ in range(2)]
    assert min(peaks) > 0
    assert max(peaks) / min(peaks) < 1.2, peaks


def cpuinfo_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the Linux CPU model")
def test_the_peak_is_measured_once_per_machine_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    cpu = torch.device("cpu")
    peak, how = device_peak_flops(cpu, torch.float32, threads=1)
    assert peak > 0 and how.startswith("measured 1024x1024")
    cached = json.loads(cache_path().read_text())
    key = machine_key(torch.float32, 1)
    assert list(cached) == [key] and cached[key]["flops"] == peak
    assert cpuinfo_model() in key and "float32" in key and "| 1 threads" in key

    cached[key]["flops"] = 1.25e9  # a figure no measurement gives: reading it proves the cache is used
    cache_path().write_text(json.dumps(cached))
    again, how = device_peak_flops(cpu, torch.float32, threads=1)
    assert again == 1.25e9 and how.startswith("cached")
    assert machine_key(torch.float32, 2) != key and machine_key(torch.bfloat16, 1) != key


def test_an_impossible_mfu_is_reported_as_a_wrong_peak(caplog):
    caplog.set_level(logging.WARNING, logger="gpt_moe.train.metrics")
    throughput = Throughput(flops_per_token=1e9, peak_flops_total=1e3, peak_source="measured while busy")
    for _ in range(2):
        throughput.add(1000)
        perf = throughput.read_and_reset()
        assert perf["wrong_peak"] is True and math.isnan(perf["mfu"]) and perf["tokens_per_sec"] > 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per run, not at every log
    assert "is wrong" in warnings[0] and "measured while busy" in warnings[0] and "--peak-flops" in warnings[0]

    sane = Throughput(flops_per_token=1.0, peak_flops_total=1e18)
    sane.add(1000)
    perf = sane.read_and_reset()
    assert perf["wrong_peak"] is False and 0 < perf["mfu"] <= 1
