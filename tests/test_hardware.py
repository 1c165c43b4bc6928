"""Hardware facts that decide the training dtype, checked against the operating system's own report."""

import platform
from pathlib import Path

import pytest
import torch

from gpt_moe.hardware import cpu_has_native_bf16, default_dtype, native_bf16, resolve_dtype

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(platform.machine() != "x86_64" or not CPUINFO.exists(), reason="reads Linux x86 CPU flags")
def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() is expected
    assert native_bf16("cpu", True) is expected  # DeepSpeed's CPU accelerator says True on every CPU
    assert default_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else torch.float32)


def test_accelerators_other_than_cpu_are_taken_at_their_word():
    assert native_bf16("cuda", True) is True
    assert native_bf16("cuda", False) is False


def test_command_line_dtypes():
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == default_dtype(torch.device("cpu"))


PAGE_FAULTS_PER_STEP = """
import resource, sys, torch
from gpt_moe.hardware import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # a training step in miniature: large temporaries of a few sizes, all freed at the end
    a, b = torch.ones(64 << 18), torch.ones(48 << 18)  # 64 MB, 48 MB
    return float((a[: 48 << 18] + b)[0])
for _ in range(10):  # until the heap has settled
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    import subprocess
    import sys

    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], check=True,
                                       capture_output=True, text=True).stdout) for mode in ("default", "keep")}
    pages_per_step = (64 + 48 + 48 << 20) // 4096
    assert faults["default"] > pages_per_step // 2  # glibc unmapped the blocks: their pages fault in again
    assert faults["keep"] < faults["default"] // 10
