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


FAULTS_OF_A_SECOND_ALLOCATION = """
import resource, sys, torch
from gpt_moe.hardware import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(64 << 18)  # 64 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 18)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    import subprocess
    import sys

    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_ALLOCATION, mode], check=True,
                                       capture_output=True, text=True).stdout) for mode in ("default", "keep")}
    pages = (64 << 20) // 4096
    assert faults["default"] > pages // 2  # glibc unmapped the first block: every page faults in again
    assert faults["keep"] < pages // 20
