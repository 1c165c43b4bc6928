"""What bf16 "auto" means on a CPU: bf16 only where a bf16 training step of this model is measurably faster.

A CPU with bf16 instructions does not make bf16 training faster: measured on a 2-core Xeon with AMX, our bf16 step
ran at 0.58x the fp32 step (the matmuls are faster, the casts, the elementwise work and the optimizer's fp32 master
copies are not), and on an AVX512-BF16 EPYC at 1.07-1.09x. So where the CPU computes bf16 natively, "auto" times
the model's own step in both dtypes and picks bf16 only when it is at least `MIN_SPEEDUP` times faster; where bf16
is emulated it is never chosen (`gpt_moe.train.hardware`), and on GPUs that support it it always is.

The step timed is DeepSpeed's, as training runs it: the run's DeepSpeed config (ZeRO stage 1 or 2; a ZeRO-3 run is
timed at stage 2) with bf16 forced on and off, one rank, the run's row length and at most `MAX_TOKENS` tokens, the
model at the run's width but at most `MAX_LAYERS` decoder layers (its dense layers and at least one MoE layer), so
that two engines fit beside each other. The time outside the matmuls is what decides (timed here: a plain-PyTorch
step with fp32 master weights put bf16 at 1.30-1.36x where DeepSpeed's step gave 1.17-1.23x), so nothing less than
the engine's step will do. It runs in a child process (`python -m gpt_moe.train.dtype_choice`, its own one-rank
process group), the two engines alternating after a warm-up step each; the fastest step of each counts. The result
is cached per machine, model, batch shape, ZeRO stage and thread count (`bf16_speed.json` beside the peak FLOP/s
cache): the ranks of one host take turns under a file lock, so the first measures and the others read its figure,
and every rank of the host decides the same. Set `bf16.enabled` to true or false in the DeepSpeed JSON to decide
yourself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.train.hardware import keep_freed_memory, unlink_cpu_allreduce_buffer
from gpt_moe.train.peak_flops import cache_path, machine_key, read_cache, write_cache_entry

log = logging.getLogger(__name__)

CACHE_FILE = "bf16_speed.json"
MIN_SPEEDUP = 1.15  # bf16 steps per fp32 step needed to give up fp32's precision; measurements vary by ~5%
MAX_TOKENS = 2048  # tokens per timed step (fewer rows of the run's length): a few seconds on 2 cores for `tiny`
MAX_LAYERS = 4
ROUNDS = 3
CHILD_TIMEOUT = 600
STEP_VERSION = 2  # in the cache key: raised when a change to the training step changes what bf16 costs, so that the
# step is timed again (2: each expert's rows padded to a multiple of 64 in bf16 on CPU, gpt_moe.model.moe)


@dataclass(frozen=True)
class Bf16Choice:
    """bf16: train in bf16; speedup: fp32 step time / bf16 step time (None when not measured); why: for the banner."""

    bf16: bool
    speedup: float | None
    why: str


def choose_bf16_on_cpu(model: ModelConfig, ds_config: dict[str, Any], seq_len: int, micro_batch: int) -> Bf16Choice:
    """The "auto" decision on a CPU that computes bf16 natively, from the measured (or cached) DeepSpeed step times
    of `model` under `ds_config` (resolved, either precision)."""
    job = timing_job(model, ds_config, seq_len, micro_batch)
    threads = torch.get_num_threads()
    key = (f"{machine_key(torch.bfloat16, threads)} | {shape_key(job['model'])} | {job['rows']}x{seq_len} | "
           f"ZeRO {job['ds_config']['zero_optimization']['stage']} | step v{STEP_VERSION}")
    with host_lock():
        entry, how = read_cache(CACHE_FILE).get(key), "cached"
        if not (isinstance(entry, dict) and isinstance(entry.get("speedup"), (int, float))):
            try:
                seconds = time_in_child(job, threads)
            except MeasurementFailed as err:
                log.warning("bf16 auto: %s; training in fp32", err)
                return Bf16Choice(False, None, f"auto: fp32, the bf16 step could not be timed ({err})")
            entry = {"speedup": seconds["fp32"] / seconds["bf16"], **{f"{k}_s": v for k, v in seconds.items()},
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            failed = write_cache_entry(CACHE_FILE, key, entry)
            how = f"measured, not cached: {failed}" if failed else "measured"
    speedup = float(entry["speedup"])
    verdict = "at least" if speedup >= MIN_SPEEDUP else "below"
    return Bf16Choice(speedup >= MIN_SPEEDUP, speedup,
                      f"auto: a bf16 step of this model ran {speedup:.2f}x the speed of an fp32 step on this CPU, "
                      f"{verdict} the {MIN_SPEEDUP}x bf16 must give ({how}: {job['rows']} x {seq_len} tokens, "
                      f"{job['model']['num_hidden_layers']} layers, {threads} threads; {cache_path(CACHE_FILE)}); "
                      "set bf16.enabled in the DeepSpeed JSON to decide yourself")


def timing_job(model: ModelConfig, ds_config: dict[str, Any], seq_len: int, micro_batch: int) -> dict[str, Any]:
    """What the child times: the model at most MAX_LAYERS deep, the config on one rank at ZeRO <= 2, the rows."""
    rows = max(1, min(micro_batch, MAX_TOKENS // seq_len))
    layers = min(model.num_hidden_layers, max(MAX_LAYERS, model.first_k_dense_replace + 1))
    zero = dict(ds_config.get("zero_optimization", {}))
    zero["stage"] = min(int(zero.get("stage", 0)), 2)
    zero = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k != "offload_param"}
    ds = {**ds_config, "zero_optimization": zero, "train_micro_batch_size_per_gpu": rows,
          "gradient_accumulation_steps": 1, "train_batch_size": rows}
    return {"model": model.replace(num_hidden_layers=layers).to_dict(), "ds_config": ds, "rows": rows,
            "seq_len": seq_len}


def shape_key(model: dict[str, Any]) -> str:
    """12 hex digits of a model's architecture (its config without the name)."""
    fields = {k: v for k, v in model.items() if k != "name"}
    return "model " + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def host_lock() -> Iterator[None]:
    """Held by one process of this machine at a time (an flock beside the cache): one rank measures at a time."""
    path = cache_path(CACHE_FILE).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError:  # an unwritable cache directory: measure without the lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class MeasurementFailed(Exception):
    pass


def time_in_child(job: dict[str, Any], threads: int) -> dict[str, float]:
    """{"fp32": s, "bf16": s} from `python -m gpt_moe.train.dtype_choice` on `threads` threads, in a one-rank
    process group of its own (whatever launcher started this process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "CROSS_RANK": "0", "CROSS_SIZE": "1",
           "OMP_NUM_THREADS": str(threads)}
    try:
        child = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(job), env=env, text=True,
                               capture_output=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MeasurementFailed(f"no result within {CHILD_TIMEOUT} s") from None
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasurementFailed(f"the timing process exited with {child.returncode}: {last}")
    return json.loads(lines[-1])


def time_engine_steps(job: dict[str, Any]) -> dict[str, float]:
    """In the child: the fastest of ROUNDS DeepSpeed training steps per precision, alternating after a warm-up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    unlink_cpu_allreduce_buffer(0)
    if get_accelerator().device_name() == "cpu":
        keep_freed_memory()  # as the trainer does (`gpt_moe.train.engine.start_distributed`)
    config = ModelConfig.from_dict(job["model"], "the timing job")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (job["rows"], job["seq_len"] + 1), generator=generator)
    steps = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = DeepSeekForCausalLM(config, seed=0)
        ds = {**job["ds_config"], "bf16": {"enabled": bf16}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        steps[name] = training_step(engine, tokens)
    best = {name: float("inf") for name in steps}
    for round_ in range(ROUNDS + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
    torch.distributed.destroy_process_group()
    return best


def training_step(engine, tokens: torch.Tensor):
    """One optimizer step of `engine` on tokens [rows, seq + 1], as a function."""
    def step() -> None:
        engine.backward(engine(tokens[:, :-1], labels=tokens[:, 1:]).loss)
        engine.step()

    return step


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(time_engine_steps(json.loads(sys.stdin.read()))))
