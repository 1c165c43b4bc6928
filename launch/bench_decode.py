"""Decode speed and cache size: MLA latent cache (absorbed up-projections) vs an expanded per-head
key/value cache vs no cache (full forward per token), side by side in one run.

    python launch/bench.py decode [--model tiny] [--contexts 256 1024 4096] [--batches 1 8] [--steps 32] [--rounds 5]
"""

from __future__ import annotations

import argparse

import torch

from gpt_moe.config import ModelConfig
from gpt_moe.hardware import resolve_dtype
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.params import account
from timing import interleaved_medians


def decoder(model: DeepSeekForCausalLM, context: torch.Tensor, steps: int, kind: str):
    """A function that greedily decodes `steps` tokens after `context` [batch, len]: with a cache of
    `kind` ("latent" or "expanded"), prefilled once and rewound to the context before every call, or
    with none (a full forward over the whole sequence per token)."""
    if kind == "none":
        def run() -> None:
            ids = context
            for _ in range(steps):
                ids = torch.cat((ids, model(ids).logits[:, -1:].argmax(-1)), dim=1)
        return run

    caches = model.new_cache(context.shape[0], context.shape[1] + steps, kind=kind)
    logits, _ = model.decode_step(context, caches)
    first = logits[:, -1:].argmax(-1)

    def run() -> None:
        for cache in caches:
            cache.length = context.shape[1]
        next_ids = first
        for _ in range(steps):
            logits, _ = model.decode_step(next_ids, caches)
            next_ids = logits[:, -1:].argmax(-1)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where this CPU/GPU has native bf16 matmuls, else fp32")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--no-cache-max-context", type=int, default=1024,
                        help="skip the (slow) no-cache column above this context")
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_name = str(dtype).removeprefix("torch.")
    config = ModelConfig.load(args.model)
    model = DeepSeekForCausalLM(config, seed=0).to(dtype).eval()
    a = account(config)
    print(f"decode, model {config.name}, {dtype_name}, {torch.get_num_threads()} threads, {args.steps} new tokens "
          f"after the context; cache per token: MLA latent {a.kv_cache_bytes_per_token:,} B vs expanded per-head "
          f"{a.mha_kv_cache_bytes_per_token:,} B ({a.mha_kv_cache_bytes_per_token / a.kv_cache_bytes_per_token:.1f}x)")
    print(f"{'batch':>5} {'context':>7} {'latent tok/s':>13} {'expanded tok/s':>15} {'no cache tok/s':>15}"
          f" {'latent/expanded':>16} {'latent/no cache':>16}")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batches:
        for context_len in args.contexts:
            context = torch.randint(0, config.vocab_size, (batch, context_len), generator=generator)
            steps = {"latent": args.steps, "expanded": args.steps}
            if context_len <= args.no_cache_max_context:
                steps["none"] = max(2, args.steps // 8)  # a full forward per token: slow, fewer tokens
            with torch.no_grad():
                seconds = interleaved_medians({kind: decoder(model, context, n, kind) for kind, n in steps.items()},
                                              args.rounds, warmup=1)
            rates = {kind: batch * steps[kind] / seconds[kind] for kind in steps}
            latent, expanded = rates["latent"], rates["expanded"]
            if "none" in rates:
                none = rates["none"]
                none_text, ratio_text = f"{none:15.1f}", f"{latent / none:15.1f}x"
            else:
                none_text, ratio_text = f"{'-':>15}", f"{'-':>16}"
            print(f"{batch:5d} {context_len:7d} {latent:13.1f} {expanded:15.1f} {none_text} "
                  f"{latent / expanded:15.2f}x {ratio_text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
