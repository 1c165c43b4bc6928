"""What the hardware does fast: whether bf16 matmuls are native, and the peak FLOP/s that MFU divides by.

bf16 halves memory and traffic everywhere, but it only speeds up compute where the hardware has
bf16 arithmetic: CUDA GPUs from Ampere on (and the other accelerators DeepSpeed reports as
supporting it), and CPUs with AVX512-BF16 or AMX. Elsewhere a CPU emulates bf16 matmuls
(measured on an AVX2-only EPYC: 0.3 GFLOP/s in bf16 against 137 in fp32), so "auto" must mean
fp32 there. The decision reads CPU feature flags and the settings that hold PyTorch's kernels to
an older instruction set (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`: with them an
AVX512-BF16 CPU emulates bf16 like an AVX2 one), not a timing, so every rank of a run agrees.

The GPU peaks are dense bf16 tensor throughput from the vendors' data sheets (no sparsity); on
a CPU the peak is measured once per machine and cached (`gpt_moe.train.peak_flops`).

On CPU, memory is the other half of speed: glibc hands every freed block above 32 MB back to
the kernel, so each large activation of each step is a fresh mapping whose pages fault in one
by one (measured here: a 50 MB row gather 28 ms, 2.9 ms once memory is kept for reuse).
`keep_freed_memory` makes the process keep and reuse what it frees, the way PyTorch's CUDA
caching allocator does on GPUs.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

import torch

from gpt_moe.train.peak_flops import cached_cpu_peak

GPU_PEAK_BF16 = {  # table order: specific names before their prefixes
    "H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "MI300X": 1307e12,
    "MI250X": 383e12,
}


# oneDNN instruction sets below the first with bf16 dot products (AVX512_CORE_BF16); ONEDNN_MAX_CPU_ISA
# set to one of these makes oneDNN, which runs PyTorch's bf16 CPU matmuls, emulate bf16
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})


@dataclass(frozen=True)
class Hardware:
    """What the accelerator a run will use can do, as far as the plan is concerned."""

    bf16_supported: bool  # runs bf16 at all
    bf16_native: bool  # computes bf16 natively (`native_bf16`)
    device_type: str = "cuda"  # DeepSpeed's accelerator: "cuda", "cpu", ...

    @classmethod
    def detect(cls) -> Hardware:
        """DeepSpeed's accelerator: a GPU where there is one, else its CPU accelerator."""
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        supported = accelerator.is_bf16_supported()
        return cls(supported, native_bf16(accelerator.device_name(), supported), accelerator.device_name())


def cpu_has_native_bf16() -> bool:
    """True when this x86 CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_kernels_limit() -> str | None:
    """Why PyTorch's CPU kernels will not use this CPU's bf16 instructions, or None when nothing holds them
    back: ATEN_CPU_CAPABILITY below AVX512 (PyTorch's own kernels) or ONEDNN_MAX_CPU_ISA (DNNL_MAX_CPU_ISA)
    below AVX512_CORE_BF16 (the matmul library). Both are read once per process, at start, from the
    environment, so every rank started with the same environment agrees."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"PyTorch's CPU kernels run at capability {capability} (ATEN_CPU_CAPABILITY)"
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(variable, "").strip().upper()
        if isa in ONEDNN_ISAS_WITHOUT_BF16:
            return f"{variable}={isa} keeps oneDNN's matmuls below AVX512_CORE_BF16"
    return None


def cpu_computes_bf16_natively() -> bool:
    """bf16 matmuls run on bf16 instructions here: the CPU has them and the kernels are allowed to use them."""
    return cpu_has_native_bf16() and cpu_kernels_limit() is None


def cpu_bf16_limit() -> str:
    """Why this CPU's bf16 matmuls are emulated (for messages): no instructions, or the kernels held back."""
    if not cpu_has_native_bf16():
        return "no AVX512-BF16 or AMX instructions"
    return cpu_kernels_limit() or "its bf16 instructions are available"


def native_bf16(device_type: str, accelerator_supports_bf16: bool) -> bool:
    """Whether to train in bf16 when the config says "auto".

    device_type: "cpu", "cuda", ...; accelerator_supports_bf16: what the accelerator itself reports
    (DeepSpeed's CPU accelerator says True for every CPU, so on CPU the feature flags decide)."""
    if device_type == "cpu":
        return cpu_computes_bf16_natively()
    return accelerator_supports_bf16


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is native on `device`, else fp32 (for benchmarks and tools outside the trainer)."""
    supported = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native_bf16(device.type, supported) else torch.float32


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A command-line dtype: "auto" (bf16 where native on `device`, else fp32), "bf16" or "fp32"."""
    if name == "auto":
        return default_dtype(device)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                      threads: int | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained). On a GPU: the data-sheet table. On CPU: the matmul
    peak of `threads` threads (default: this process's) in `dtype`, measured once per machine and cached
    (`gpt_moe.train.peak_flops`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"table: {name}"
        return float("nan"), f"unknown device {name} (MFU not reported)"
    native = dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_computes_bf16_natively())
    return cached_cpu_peak(dtype, threads or torch.get_num_threads(), emulated=not native)


def deepspeed_cuda_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST written so that DeepSpeed's JIT op builder can read it.

    PyTorch writes architecture-specific targets with a letter ("9.0a" for sm_90a); DeepSpeed 0.19 reads
    every entry as numbers and fails at the first letter (seen on an H200 image that sets "9.0a": building
    FusedAdam for the default optimizer stopped with "invalid literal for int() with base 10: '0a'"). The
    letter is dropped ("9.0a" -> "9.0"), which only loses Hopper-specific instructions in DeepSpeed's own
    kernels; "+PTX" is kept. Entries are separated by ";" or spaces, as both libraries accept."""
    entries = value.replace(";", " ").split()
    return ";".join(re.sub(r"^(\d+)\.(\d+)[a-z]+", r"\1.\2", entry) for entry in entries)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of unmapping it (CPU tensors only; the
    process holds on to its peak usage). Returns False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # blocks of any size come from the heap, and the heap is never trimmed back to the kernel
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the kernel once (glibc's malloc_trim(0)); with `keep_freed_memory` the
    heap is otherwise never trimmed. Called after the engine is built: building it frees about as much as it
    keeps (whole parameters replaced by ZeRO partitions, partitions copied into flat buffers), and without
    this a `small` ZeRO-3 rank held 7.7 GiB where 3.6 GiB were live. Returns False where libc is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Removes the name of this rank's shared-memory allreduce workspace of DeepSpeed's CPU accelerator.

    DeepSpeed maps a 69 MB workspace per rank from RAM-backed /dev/shm
    (`deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`) and never unlinks it, so every
    run left its workspaces behind (seen here: 295 of them, 19 GB of RAM, after a day of test runs). Each rank
    maps every other rank's workspace inside `init_distributed`; after a barrier that follows it, the names can
    go: the mappings stay valid, and the memory returns when the last process exits, however it exits."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except OSError:
        pass  # not created (another accelerator, no shm op) or already gone



class MemoryWindow:
    """The memory of one piece of work (building the model and reading `--init-from` weights): this process's
    resident set when the window opens and its peak inside it, in GiB.

    On Linux the kernel's peak mark (VmHWM, which getrusage's ru_maxrss reads too) is reset when the window opens
    (/proc/self/clear_refs "5"), so the peak is the window's own; `peak_before_gib` keeps the process's peak until
    then, which the run's closing figure (summary.json `peak_memory_gib`) still counts. On a GPU: allocated memory,
    its peak counter reset likewise. Where neither works, `read` gives (None, None)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_before_gib = _status_gib("VmHWM")
        self.before_gib: float | None = None
        if device.type == "cuda":
            self.peak_before_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(device)
            self.before_gib = torch.cuda.memory_allocated(device) / 2 ** 30
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before_gib = _status_gib("VmRSS")
        except OSError:
            self.before_gib = None

    def read(self) -> tuple[float | None, float | None]:
        """(resident when the window opened, peak since), GiB."""
        if self.before_gib is None:
            return None, None
        if self.device.type == "cuda":
            return self.before_gib, torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return self.before_gib, _status_gib("VmHWM")


def _status_gib(field: str) -> float | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in GiB, None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None
