"""--compile: a training forward and backward with the decoder layers compiled vs eager, interleaved in one process.

    python launch/bench.py compile [--model tiny] [--dtype fp32|bf16] [--micro-batch 8] [--seq-len 256] [--rounds 8]

One model, compiled once (`compile_layers`); each round times one eager and one compiled step on the same batch
(the compiled graphs are switched off and on), so machine noise falls on both, and each round draws a new batch, so
the experts' row counts change from step to step as in training (bf16 kernels on CPU are built per shape). Prints
the first compiled step (the compilation), each side's step times and median, and the ratio. The optimizer step is
not part of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python launch/bench.py compile", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    config = ModelConfig.load(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = DeepSeekForCausalLM(config, seed=0).to(dtype).train()
    model.compile_layers()
    compiled = [layer.compiled_forward for layer in model.model.layers]
    generator = torch.Generator().manual_seed(0)

    def new_batch() -> None:
        nonlocal inputs, labels
        tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]

    inputs = labels = torch.empty(0)
    new_batch()

    def step(compiled_on: bool) -> tuple[float, float]:
        for layer, forward in zip(model.model.layers, compiled):
            layer.compiled_forward = forward if compiled_on else None
        started = time.perf_counter()
        out = model(inputs, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, out.loss.item()

    first, compiled_loss = step(True)
    _, eager_loss = step(False)
    print(f"{args.model} {args.dtype}, micro-batch {args.micro_batch} x {args.seq_len}: first compiled step "
          f"{first:.1f}s (compiling included); loss eager {eager_loss:.6f}, compiled {compiled_loss:.6f}")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        new_batch()
        for compiled_on in (False, True):
            times[compiled_on].append(step(compiled_on)[0])
    for compiled_on, label in ((False, "eager"), (True, "compiled")):
        print(f"{label:>9} s/step: " + " ".join(f"{t:.3f}" for t in times[compiled_on])
              + f"  median {statistics.median(times[compiled_on]):.3f}")
    print(f"compiled speed-up (eager / compiled, medians): "
          f"{statistics.median(times[False]) / statistics.median(times[True]):.3f}x")
    return 0
