"""Hardware facts that decide the training dtype, checked against the operating system's own report."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt_moe.train.hardware import (ONEDNN_ISAS_WITHOUT_BF16, cpu_has_native_bf16, deepspeed_cuda_arch_list,
                                    default_dtype, native_bf16, resolve_dtype)

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


@pytest.mark.skipif(platform.machine() != "x86_64" or not CPUINFO.exists(), reason="reads Linux x86 CPU flags")
def test_native_bf16_agrees_with_the_kernels_cpu_flags():
    flags = cpu_flags()
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    kernels_free = (torch.backends.cpu.get_cpu_capability() == "AVX512"
                    and os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in ONEDNN_ISAS_WITHOUT_BF16)
    assert cpu_has_native_bf16() is has_bf16
    expected = has_bf16 and kernels_free
    assert native_bf16("cpu", True) is expected  # DeepSpeed's CPU accelerator says True on every CPU
    assert default_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else torch.float32)


AVX2_SETTINGS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
DECISION = ("import torch; from gpt_moe.train.hardware import cpu_kernels_limit, native_bf16; "
            "print(torch.backends.cpu.get_cpu_capability()); print(native_bf16('cpu', True)); "
            "print(cpu_kernels_limit())")


def decision_under(env_changes: dict[str, str]) -> tuple[str, str, str]:
    """(PyTorch's CPU capability, native_bf16, cpu_kernels_limit) in a process started with only `env_changes`
    of the AVX2 settings (the suite itself may run under them)."""
    env = {k: v for k, v in os.environ.items() if k not in AVX2_SETTINGS}
    out = subprocess.run([sys.executable, "-c", DECISION], env={**env, **env_changes}, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return out[0], out[1], out[2]


def test_settings_that_hold_the_kernels_to_avx2_mean_emulated_bf16():
    """The documented way to exercise the AVX2 path on an AVX512-BF16 CPU: "auto" must pick fp32 there,
    since the kernels will emulate bf16 whatever the CPU flags say."""
    capability, native, reason = decision_under(AVX2_SETTINGS)
    assert (capability, native) == ("AVX2", "False")
    assert "capability AVX2 (ATEN_CPU_CAPABILITY)" in reason

    capability, native, reason = decision_under({"ONEDNN_MAX_CPU_ISA": "avx2"})  # the matmul library alone
    assert native == "False"
    assert ("ONEDNN_MAX_CPU_ISA=AVX2" if capability == "AVX512" else f"capability {capability}") in reason

    capability, native, reason = decision_under({})
    assert native == str(cpu_has_native_bf16() and capability == "AVX512")
    assert (reason == "None") == (capability == "AVX512")


def test_accelerators_other_than_cpu_are_taken_at_their_word():
    assert native_bf16("cuda", True) is True
    assert native_bf16("cuda", False) is False


def test_cuda_arch_list_for_deepspeeds_op_builder():
    assert deepspeed_cuda_arch_list("9.0a") == "9.0"
    assert deepspeed_cuda_arch_list("8.0;8.6 9.0a 10.0a+PTX") == "8.0;8.6;9.0;10.0+PTX"
    assert deepspeed_cuda_arch_list("") == ""


def test_command_line_dtypes():
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == default_dtype(torch.device("cpu"))


PAGE_FAULTS_PER_STEP = """
import resource, sys, torch
from gpt_moe.train.hardware import keep_freed_memory
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
    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], check=True,
                                       capture_output=True, text=True).stdout) for mode in ("default", "keep")}
    pages_per_step = (64 + 48 + 48 << 20) // 4096
    assert faults["default"] > pages_per_step // 2  # glibc unmapped the blocks: their pages fault in again
    assert faults["keep"] < faults["default"] // 10
