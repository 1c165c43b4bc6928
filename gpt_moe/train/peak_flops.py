"""The CPU peak FLOP/s that MFU divides by: measured robustly once per machine, then read from a cache.

A start-up measurement that runs a few small matmuls swings by 3x between runs (measured on an
AVX512-BF16 EPYC: the first bf16 matmul is slow to warm up, a 128-256 matrix never reaches the
kernel's speed, and ranks measuring at the same time share the cores), so the same kind of work
showed MFU 24%, 87% and 99%. Here:

* warm-up matmuls run before the clock starts;
* the matrices are `NATIVE_SIZE` (1024) square in a dtype the CPU computes natively; only an
  emulated dtype (bf16 without AVX512-BF16/AMX, where one 1024^3 matmul takes seconds) shrinks them;
* the figure is the best batch of several over at least `MEASURE_SECONDS` (the best excludes the
  moments another process took a core);
* the caller measures once per host with all the threads the host's ranks use together (see
  `gpt_moe.train.trainer.Trainer._peak_flops`);
* the result is cached per machine, keyed by CPU model, a hash of the CPU flags, the kernels'
  instruction-set limits, the dtype and the thread count, in `peak_flops.json` under
  $GPT_MOE_CACHE_DIR, else $XDG_CACHE_HOME/gpt-moe, else ~/.cache/gpt-moe; every later run on the
  machine divides by the same number. `--peak-flops` overrides it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gpt_moe.atomic import write_atomic

CACHE_ENV = "GPT_MOE_CACHE_DIR"
CACHE_FILE = "peak_flops.json"
NATIVE_SIZE = 1024
MEASURE_SECONDS = 1.0
BATCH_SECONDS = 0.01  # a timed batch: short enough to fit between the time slices of other processes


def cache_path(name: str = CACHE_FILE) -> Path:
    """Where measurements of this machine are kept: $GPT_MOE_CACHE_DIR, $XDG_CACHE_HOME/gpt-moe or
    ~/.cache/gpt-moe, file `name`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / name
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt-moe" / name


def cpu_identity() -> tuple[str, str]:
    """(CPU model name, 12 hex digits of the sha256 of its sorted feature flags) from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return model, hashlib.sha256(flags.encode()).hexdigest()[:12]


def machine_key(dtype: torch.dtype, threads: int) -> str:
    """The cache key: CPU model, flags hash, kernel limits (PyTorch capability, oneDNN ISA), dtype, threads."""
    model, flags = cpu_identity()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "all"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{model} | flags {flags} | {capability} oneDNN {isa.upper()} | {str(dtype).removeprefix('torch.')} | " \
           f"{threads} threads"


def read_cache(name: str = CACHE_FILE) -> dict[str, dict]:
    """Every cached measurement by key ({} when the file is missing or unreadable: it is measured again)."""
    try:
        data = json.loads(cache_path(name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache_entry(name: str, key: str, entry: dict) -> str | None:
    """Adds `entry` under `key` to the cache file `name`; None, or why it could not (an unwritable cache only
    costs a measurement per run)."""
    entries = read_cache(name)  # again: another host sharing the home directory may have written meanwhile
    entries[key] = entry
    try:
        cache_path(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path(name), json.dumps(entries, indent=1, sort_keys=True))
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def cached_cpu_peak(dtype: torch.dtype, threads: int, emulated: bool) -> tuple[float, str]:
    """(peak FLOP/s of `threads` threads in `dtype`, how it was obtained): the cached figure of this machine,
    or a measurement that is then cached. emulated: the CPU has no arithmetic for `dtype` (smaller matrices)."""
    key = machine_key(dtype, threads)
    entry = read_cache().get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"]), f"cached {cache_path()} [{key}]"
    peak, size = measure_matmul_peak(dtype, threads, emulated)
    failed = write_cache_entry(CACHE_FILE, key, {"flops": peak, "matrix": size,
                                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if failed:
        return peak, f"measured {size}x{size} matmuls [{key}] (not cached: {failed})"
    return peak, f"measured {size}x{size} matmuls [{key}], cached in {cache_path()}"


@contextmanager
def num_threads(threads: int):
    """PyTorch's intra-op thread count set to `threads` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def usable_cores() -> set[int]:
    """The CPU numbers this process may run on (all of the machine's where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


@contextmanager
def cpu_affinity(cores: set[int]):
    """This process may run on `cores` inside the block (as far as the OS allows), restored after."""
    before = usable_cores()
    try:
        os.sched_setaffinity(0, cores)
    except (OSError, AttributeError):
        pass
    try:
        yield
    finally:
        if hasattr(os, "sched_setaffinity") and usable_cores() != before:
            os.sched_setaffinity(0, before)


def measure_matmul_peak(dtype: torch.dtype, threads: int, emulated: bool = False,
                        seconds: float = MEASURE_SECONDS) -> tuple[float, int]:
    """(FLOP/s, matrix size) of square CPU matmuls on `threads` threads: warm-up excluded, the best timed
    batch over at least `seconds`. Native dtypes use NATIVE_SIZE; an emulated one doubles from 128 while one
    matmul stays quick, so that the measurement does not stall the start of a run."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (saved in checkpoints) alone
    with num_threads(threads):
        size = NATIVE_SIZE if not emulated else _emulated_size(dtype, generator, seconds)
        a = torch.randn(size, size, dtype=dtype, generator=generator)
        b = torch.randn(size, size, dtype=dtype, generator=generator)
        start = time.perf_counter()
        for _ in range(3):  # warm-up: first-call dispatch, page faults, the cores' clock ramp
            a @ b
        per_matmul = (time.perf_counter() - start) / 3
        repeats = max(1, round(BATCH_SECONDS / max(per_matmul, 1e-6)))
        best, deadline, batches = 0.0, time.perf_counter() + seconds, 0
        while batches < 5 or time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, repeats * 2 * size ** 3 / (time.perf_counter() - start))
            batches += 1
    return best, size


def _emulated_size(dtype: torch.dtype, generator: torch.Generator, seconds: float) -> int:
    """The largest of 128, 256, ..., NATIVE_SIZE at which one matmul takes under seconds/32."""
    size = 128
    while size < NATIVE_SIZE:
        a = torch.randn(size, size, dtype=dtype, generator=generator)
        start = time.perf_counter()
        a @ a
        if (time.perf_counter() - start) * 32 > seconds:
            break
        size *= 2
    return size
