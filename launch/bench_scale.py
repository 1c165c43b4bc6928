"""Scaling table: tokens/s and peak memory per rank of `tiny` and `small` on 2 CPU ranks, per ZeRO stage, optimizer
offload, EP size and activation checkpointing, next to the dry-run estimate of each row.

    python launch/bench.py scale [--models tiny,small] [--steps 3] [--reserve-gib 3]

Every row is a real `deepspeed --num_gpus 2 launch/train.py` run (fp32) of a few steps; peak memory is each rank's
getrusage ru_maxrss (`peak_memory_gib` in summary.json), tokens/s the last step's. A row whose estimate does not
fit in the memory available now minus --reserve-gib prints "does not fit" with its estimate instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from launching import REPO, train

from gpt_moe.checkpoint.records import Layout
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.recompute import MODES
from gpt_moe.train.memory_plan import MemoryLayout, training_memory

SHAPES = {"tiny": (256, 8), "small": (32, 1)}  # (seq_len, micro_batch) per model
STAGES = {"ZeRO-1": ("zero1.json", 1, False), "ZeRO-2": ("zero2.json", 2, False), "ZeRO-3": ("zero3.json", 3, False),
          "ZeRO-2 offload": ("zero2_offload.json", 2, True)}


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def fp32_config(name: str, directory: Path) -> Path:
    config = json.loads((REPO / "ds_configs" / name).read_text())
    config["bf16"] = {"enabled": False}
    path = directory / name
    path.write_text(json.dumps(config))
    return path


def run_row(model: str, stage: str, ep: int, mode: str, data: Path, work: Path, steps: int) -> dict:
    """One training run; returns its summary (peak memory per rank, history)."""
    seq, batch = SHAPES[model]
    run_dir = work / f"{model}-{stage.replace(' ', '_')}-ep{ep}-{mode}"
    train("--model", model, "--deepspeed", str(fp32_config(STAGES[stage][0], work)), "--data", str(data),
          "--run-dir", str(run_dir), "--ep-size", str(ep), "--activation-checkpointing", mode,
          "--seq-len", str(seq), "--micro-batch", str(batch), "--max-steps", str(steps), "--log-interval", "1",
          "--eval-interval", "1000", "--save-interval", "1000", "--sample-tokens", "0", "--warmup-steps", "1",
          ranks=2, timeout=1800)
    summary = json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return summary


def estimate(model: str, stage: str, ep: int, mode: str) -> float:
    seq, batch = SHAPES[model]
    _, zero, offload = STAGES[stage]
    sub_group = 20_000_000 if zero == 3 else 10 ** 12  # ds_configs/zero3.json
    layout = MemoryLayout(Layout(2, ep, zero, False), seq, batch, mode, offload, "cpu", sub_group)
    return training_memory(ModelConfig.load(model), layout).total_gib


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward pass at the end of one forward (distinct storages, parameters
    excluded): the activation memory of that forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    size = sum(kept.values())
    out.loss.backward()
    return size


def activation_table(model_name: str = "tiny", seq: int = 256, batch: int = 16, repeats: int = 5) -> None:
    """One process, fp32: activation memory and forward+backward time per checkpointing mode, as ratios to none."""
    import time

    import torch

    from gpt_moe.model.model import DeepSeekForCausalLM
    from gpt_moe.train.hardware import keep_freed_memory

    config = ModelConfig.load(model_name)
    model = DeepSeekForCausalLM(config, seed=0).train()
    ids = torch.randint(0, min(config.vocab_size, 1024), (batch, seq), generator=torch.Generator().manual_seed(0))
    keep_freed_memory()  # as the trainer does on CPU: no page faults in the timed steps
    modes = MODES
    sizes, times = {}, {mode: [] for mode in modes}
    for mode in modes:  # the first pass of each mode is its warm-up
        model.set_activation_checkpointing(mode)
        sizes[mode] = saved_activation_bytes(model, ids)
    for _ in range(repeats):  # interleaved rounds: a slowdown of the shared machine hits every mode alike
        for mode in modes:
            model.set_activation_checkpointing(mode)
            start = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            times[mode].append(time.perf_counter() - start)
    rows = {mode: (sizes[mode], sorted(times[mode])[repeats // 2]) for mode in modes}
    print(f"activations, {model_name}, seq {seq} x micro-batch {batch}, one process, fp32 (median of {repeats}):")
    base_size, base_time = rows["none"]
    for mode, (size, step) in rows.items():
        print(f"  {mode:9s} kept {size / 2 ** 20:8.1f} MiB ({base_size / size:4.2f}x less)   forward+backward "
              f"{step * 1000:7.1f} ms ({step / base_time:4.2f}x)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/bench.py scale", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--modes", default="none,full,selective")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="memory to leave free for others")
    parser.add_argument("--data", default="", help="prepared data (default: a small built-in corpus, prepared)")
    parser.add_argument("--no-activations", action="store_true", help="skip the one-process activation table")
    args = parser.parse_args(argv)
    if not args.no_activations:
        activation_table()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    data = Path(args.data) if args.data else prepare(work)
    print(f"{'model':6s} {'stage':15s} {'EP':>2s} {'ckpt':9s} {'tokens/s':>9s} {'peak GiB/rank':>13s} "
          f"{'estimate':>8s} {'est/meas':>8s}", flush=True)
    for model in args.models.split(","):
        for stage in args.stages.split(","):
            for ep in (1, 2):
                for mode in args.modes.split(","):
                    print(row(model, stage, ep, mode, data, work, args), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def row(model: str, stage: str, ep: int, mode: str, data: Path, work: Path, args) -> str:
    guess = estimate(model, stage, ep, mode)
    head = f"{model:6s} {stage:15s} {ep:2d} {mode:9s}"
    if 2 * guess > available_gib() - args.reserve_gib:
        return f"{head} {'does not fit':>23s} {guess:8.2f}   (2 ranks > {available_gib():.1f} GiB free - reserve)"
    summary = run_row(model, stage, ep, mode, data, work, args.steps)
    peak = max(summary["peak_memory_gib"])
    tokens = summary["history"][-1]["perf/tokens_per_sec"]
    return f"{head} {tokens:9.0f} {peak:13.2f} {guess:8.2f} {guess / peak:8.2f}"


def prepare(work: Path) -> Path:
    import subprocess

    out = work / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "--source", "builtin", "--tokenizer", "bpe:1024",
                    "--max-tokens", "600000", "--val-fraction", "0.1", "--out", str(out), "--no-progress"],
                   check=True, capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


if __name__ == "__main__":
    sys.exit(main())
