"""Where a training step's time goes: one DeepSpeed step of the model, in fp32 and in bf16, broken down by part.

    python launch/bench.py profile [--model tiny] [--deepspeed ds_configs/zero2.json] [--seq-len 256]
                                   [--micro-batch 8] [--steps 2]

The step is the one `launch/train.py` runs (the trainer's plan and engine builder, one rank), once with bf16 forced
off and once on. torch.profiler records `--steps` steps after two warm-up steps; forward hooks put each module's
forward in a named range. Parts of the forward: attention (MLA: projections, RoPE, SDPA), router (scores, bias,
group-limited top-k), routed experts (the grouped matmuls), dispatch (what the MoE layer does around them: sort,
gather, combine; the MoE time not in its router, experts or shared experts), dense FFN and shared experts, norms,
head + loss (the chunked linear cross-entropy), other (embedding, residual adds, Python between modules). The
backward is split by autograd node (matmul, grouped matmul, attention, head + loss, casts, gradient accumulation
with ZeRO's reduction hooks, the rest), and the optimizer step (DeepSpeed's: ZeRO buckets, fp32 master weights
in bf16) is one part. Casts (`aten::_to_copy`, all phases) are shown as "of which". Each part in ms per step and
in % of the step, and bf16's time over fp32's for each part: the parts where bf16 does not pay.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from bench_train import plan_for

FORWARD_PARTS = {"MultiHeadLatentAttention": "attention", "TopkRouter": "router", "Experts": "routed experts",
                 "MoE": "dispatch", "MLP": "dense FFN + shared experts", "RMSNorm": "norms", "LMHead": "head + loss"}
BACKWARD_PARTS = (("GroupedMm", "grouped matmul"), ("ScaledDotProduct", "attention"), ("LinearCrossEntropy",
                  "head + loss"), ("Mm", "matmul"), ("Addmm", "matmul"), ("ToCopy", "casts"),
                  ("AccumulateGrad", "gradient accumulation + ZeRO hooks"))


def label_modules(model: torch.nn.Module) -> None:
    """Every module of a FORWARD_PARTS class runs its forward inside a `gpt_moe::<part>` profiler range."""
    for module in model.modules():
        part = FORWARD_PARTS.get(type(module).__name__)
        if part is None:
            continue

        def enter(mod, args, part=part):
            mod._profile_range = torch.profiler.record_function(f"gpt_moe::{part}")
            mod._profile_range.__enter__()

        def leave(mod, args, output):
            mod._profile_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def phased_step(engine, inputs: torch.Tensor, labels: torch.Tensor):
    def step() -> None:
        with torch.profiler.record_function("gpt_moe::forward"):
            loss = engine(input_ids=inputs, labels=labels).loss
        with torch.profiler.record_function("gpt_moe::backward"):
            engine.backward(loss)
        with torch.profiler.record_function("gpt_moe::optimizer step"):
            engine.step()

    return step


def exclusive_ms(event) -> float:
    """An event's time without its labelled (gpt_moe::) descendants, in ms."""
    def labelled_below(e) -> float:
        return sum(c.cpu_time_total if c.name.startswith("gpt_moe::") else labelled_below(c) for c in e.cpu_children)

    return (event.cpu_time_total - labelled_below(event)) / 1e3


def backward_part(name: str) -> str:
    node = name.removeprefix("autograd::engine::evaluate_function: ").removeprefix("torch::autograd::")
    return next((part for key, part in BACKWARD_PARTS if node.startswith(key)), "elementwise and other")


def breakdown(events, steps: int) -> dict[str, float]:
    """ms per step by part (see the module docstring)."""
    parts: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith("gpt_moe::") and event.name != "gpt_moe::backward":
            name = event.name.removeprefix("gpt_moe::")
            parts["forward: other" if name == "forward" else name] += exclusive_ms(event)
        elif event.name == "gpt_moe::backward":
            inside = 0.0
            for child in event.cpu_children:
                part = backward_part(child.name)
                parts[f"backward: {part}"] += child.cpu_time_total / 1e3
                inside += child.cpu_time_total / 1e3
            parts["backward: engine and other"] += event.cpu_time_total / 1e3 - inside
        elif event.name == "aten::_to_copy" and not (event.cpu_parent and event.cpu_parent.name == "aten::_to_copy"):
            parts["of which casts (aten::_to_copy)"] += event.cpu_time_total / 1e3
    return {part: ms / steps for part, ms in parts.items()}


def profile_step(args: argparse.Namespace, bf16: bool) -> tuple[dict[str, float], float]:
    """(ms per step by part, ms per step of wall time) of the plan's step with bf16 forced `bf16`."""
    raw = json.loads(Path(args.deepspeed).read_text())
    raw["bf16"] = {"enabled": bf16}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(raw, f)
    plan = plan_for(argparse.Namespace(**{**vars(args), "deepspeed": f.name}))
    Path(f.name).unlink()
    from gpt_moe.model.model import DeepSeekForCausalLM

    model = DeepSeekForCausalLM(plan.model, seed=0)
    label_modules(model)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, plan.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)
    from gpt_moe.train.engine import build_engine

    step = phased_step(build_engine(plan, model), tokens[:, :-1], tokens[:, 1:])
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.events() if e.cpu_parent is None or e.name.startswith("gpt_moe::")
              or e.name == "aten::_to_copy"]
    phases = [e for e in prof.events() if e.name in ("gpt_moe::forward", "gpt_moe::backward",
                                                       "gpt_moe::optimizer step")]
    return breakdown(events, args.steps), sum(e.cpu_time_total for e in phases) / 1e3 / args.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    from gpt_moe.train.engine import start_distributed
    from gpt_moe.train.hardware import cpu_bf16_limit, cpu_computes_bf16_natively

    device = start_distributed(2).device
    results = {name: profile_step(args, bf16) for name, bf16 in (("fp32", False), ("bf16", True))}
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    kind = ("AMX + AVX512-BF16" if amx else "AVX512-BF16" if cpu_computes_bf16_natively()
            else f"bf16 emulated: {cpu_bf16_limit()}")
    where = f"{device.type}, {platform.processor() or platform.machine()}, {kind}, {torch.get_num_threads()} threads"
    print(f"one training step of {args.model}, {args.micro_batch} x {args.seq_len} tokens, {args.deepspeed}, "
          f"{where}; ms per step (profiled, {args.steps} steps):")
    (fp32, fp32_total), (bf16, bf16_total) = results["fp32"], results["bf16"]
    order = sorted(set(fp32) | set(bf16), key=lambda p: (p.startswith("of which"), -fp32.get(p, 0.0)))
    print(f"{'part':>44} {'fp32 ms':>9} {'%':>5} {'bf16 ms':>9} {'%':>5} {'bf16/fp32':>10}")
    for part in order:
        a, b = fp32.get(part, 0.0), bf16.get(part, 0.0)
        print(f"{part:>44} {a:9.1f} {100 * a / fp32_total:5.1f} {b:9.1f} {100 * b / bf16_total:5.1f} "
              f"{b / a if a else float('nan'):10.2f}")
    print(f"{'step (forward + backward + optimizer)':>44} {fp32_total:9.1f} {100.0:5.1f} {bf16_total:9.1f} "
          f"{100.0:5.1f} {bf16_total / fp32_total:10.2f}")
    print(f"bf16 step speed over fp32: {fp32_total / bf16_total:.2f}x")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
