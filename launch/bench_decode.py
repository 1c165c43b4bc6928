"""Decode speed and cache size: MLA latent cache (absorbed up-projections) vs an expanded per-head
key/value cache vs no cache (full forward per token), and at batch 1 self-speculative decoding (the MTP block
drafts, the main model verifies two positions per forward), side by side in one run.

    python launch/bench.py decode [--model tiny | --checkpoint PATH] [--contexts 256 1024 4096] [--batches 1 8]
                                  [--steps 32] [--rounds 5] [--text FILE ...]

With --checkpoint the contexts are real text (by default this repository's gpt_moe/**/*.py sources, which the
built-in corpus does not contain) and the speculative table gives the measured acceptance of the MTP drafts;
with --model the weights are random (acceptance ~0: the speculative figures then show its overhead only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import interleaved_medians

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.params import account
from gpt_moe.serve.generate import SamplingConfig, SelfSpeculativeDecoder
from gpt_moe.train.hardware import resolve_dtype

TARGET = 1.4  # speculative / plain latent-cache tokens/s at batch 1 (issue 14)


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


def speculative_decoder(model: DeepSeekForCausalLM, context: torch.Tensor, steps: int):
    """(run, facts): `run` greedily decodes at least `steps` tokens after `context` [1, len] with a
    `SelfSpeculativeDecoder`, prefilled once and restored to the context before every call; facts: tokens
    emitted per run, main forwards per run and the drafts' acceptance (greedy: the same every run)."""
    sampling = SamplingConfig(max_new_tokens=steps, temperature=0.0, top_k=0, top_p=1.0)
    speculative = SelfSpeculativeDecoder(model, sampling, context.shape[1] + steps + 2)
    speculative.prefill(context)
    start = speculative.snapshot()
    facts = {}

    def run() -> None:
        speculative.restore(start)
        before = (speculative.stats.drafted, speculative.stats.accepted)
        emitted = 0
        while emitted < steps:
            emitted += len(speculative.step())
        drafted, accepted = speculative.stats.drafted - before[0], speculative.stats.accepted - before[1]
        facts.update(tokens=emitted, forwards=drafted, accepted=accepted)
    return run, facts


def load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[DeepSeekForCausalLM, object]:
    """(model, tokenizer or None): the checkpoint's trained weights, or random ones of --model."""
    if args.checkpoint:
        from gpt_moe.checkpoint.loading import load_for_inference

        loaded = load_for_inference(args.checkpoint)
        return loaded.model.to(dtype).eval(), loaded.tokenizer
    return DeepSeekForCausalLM(ModelConfig.load(args.model), seed=0).to(dtype).eval(), None


def contexts(tokenizer, args: argparse.Namespace, vocab: int, batch: int, length: int,
             spread: bool = False) -> torch.Tensor:
    """[batch, length] ids: with a tokenizer, pieces of the text (rows 97 tokens apart, or with `spread` spaced
    evenly over the whole text: different files, different code), else random ids."""
    if tokenizer is None:
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(length + batch))
    files = args.text or sorted((Path(__file__).resolve().parent.parent / "gpt_moe").rglob("*.py"))
    ids = tokenizer.encode_ordinary("\n\n".join(Path(f).read_text() for f in files))
    gap = (len(ids) - length) // batch if spread else 97
    if gap < 1 or len(ids) < length + (batch - 1) * gap:
        raise SystemExit(f"--text: {len(ids)} tokens are too few for {batch} contexts of {length}")
    return torch.tensor([ids[row * gap: row * gap + length] for row in range(batch)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="preset with random weights (without --checkpoint)")
    parser.add_argument("--checkpoint", help="trained weights (run, checkpoint or export directory)")
    parser.add_argument("--text", nargs="+", help="files whose tokens are the contexts (with --checkpoint)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where this CPU/GPU has native bf16 matmuls, else fp32")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--samples", type=int, default=8,
                        help="contexts per length in the speculative table (its acceptance depends on the text)")
    parser.add_argument("--no-cache-max-context", type=int, default=1024,
                        help="skip the (slow) no-cache column above this context")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model, tokenizer = load_model(args, dtype)
    config = model.config
    a = account(config)
    print(f"decode, model {config.name} ({args.checkpoint or 'random weights'}), {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, {args.steps} new tokens after the context; cache per token: MLA "
          f"latent {a.kv_cache_bytes_per_token:,} B vs expanded per-head {a.mha_kv_cache_bytes_per_token:,} B "
          f"({a.mha_kv_cache_bytes_per_token / a.kv_cache_bytes_per_token:.1f}x)")
    print(f"{'batch':>5} {'context':>7} {'latent tok/s':>13} {'expanded tok/s':>15} {'no cache tok/s':>15}"
          f" {'latent/expanded':>16} {'latent/no cache':>16}")
    speculative_rows = []
    for batch in args.batches:
        for context_len in args.contexts:
            context = contexts(tokenizer, args, config.vocab_size, batch, context_len)
            rates = measure(model, context, args)
            latent, expanded = rates["latent"], rates["expanded"]
            none_text, ratio_text = (f"{rates['none']:15.1f}", f"{latent / rates['none']:15.1f}x") \
                if "none" in rates else (f"{'-':>15}", f"{'-':>16}")
            print(f"{batch:5d} {context_len:7d} {latent:13.1f} {expanded:15.1f} {none_text} "
                  f"{latent / expanded:15.2f}x {ratio_text}")
            if batch == 1 and model.model.mtp_layer is not None:
                samples = contexts(tokenizer, args, config.vocab_size, args.samples, context_len, spread=True)
                speculative_rows.append((context_len, *measure_speculative(model, samples, args)))
    print_speculative(speculative_rows, args.steps, args.samples)
    return 0


def measure(model: DeepSeekForCausalLM, context: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of every cache kind on this context [batch, len], timed in interleaved rounds."""
    batch, context_len = context.shape
    steps = {"latent": args.steps, "expanded": args.steps}
    if context_len <= args.no_cache_max_context:
        steps["none"] = max(2, args.steps // 8)  # a full forward per token: slow, fewer tokens
    with torch.no_grad():
        seconds = interleaved_medians({kind: decoder(model, context, n, kind) for kind, n in steps.items()},
                                      args.rounds, warmup=1)
    return {kind: batch * steps[kind] / seconds[kind] for kind in steps}


def measure_speculative(model: DeepSeekForCausalLM, samples: torch.Tensor, args: argparse.Namespace,
                        ) -> tuple[float, float, dict]:
    """Batch 1, each of the contexts `samples` [n, len] in turn: (latent-cache tokens/s, speculative tokens/s,
    facts summed over the contexts), the two decoders timed in interleaved rounds."""
    runs, facts = {}, []
    with torch.no_grad():
        for i, row in enumerate(samples):  # per context, the two take turns: a burst of load hits both alike
            runs[("latent", i)] = decoder(model, row[None], args.steps, "latent")
            runs[("speculative", i)], row_facts = speculative_decoder(model, row[None], args.steps)
            facts.append(row_facts)
        seconds = interleaved_medians(runs, args.rounds, warmup=1)
    total = {key: sum(f[key] for f in facts) for key in ("tokens", "forwards", "accepted")}
    latent = sum(t for (kind, _), t in seconds.items() if kind == "latent")
    speculative = sum(t for (kind, _), t in seconds.items() if kind == "speculative")
    return len(samples) * args.steps / latent, total["tokens"] / speculative, total


def print_speculative(rows: list, steps: int, samples: int) -> None:
    """The batch-1 speculative table; `needed` is the acceptance at which this forward cost would give TARGET."""
    if not rows:
        return
    print(f"\nself-speculative decoding, batch 1, greedy ({steps}+ new tokens after each of {samples} contexts; "
          "the tokens of plain greedy)")
    print(f"{'context':>7} {'latent tok/s':>13} {'speculative tok/s':>18} {'speculative/latent':>19} "
          f"{'acceptance':>11} {f'needed for {TARGET}x':>17}")
    for context_len, latent, speculative, facts in rows:
        # a speculative step costs c plain steps and yields 1 + acceptance tokens: speed-up = (1 + a) / c
        cost = latent / speculative * (facts["tokens"] / facts["forwards"])
        needed = TARGET * cost - 1
        print(f"{context_len:7d} {latent:13.1f} {speculative:18.1f} {speculative / latent:18.2f}x "
              f"{facts['accepted'] / facts['forwards']:10.0%} {needed:16.0%}"
              + (" (over 100%: out of reach)" if needed > 1 else ""))


if __name__ == "__main__":
    raise SystemExit(main())
