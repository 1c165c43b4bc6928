"""Decode speed and cache size: MLA latent cache (absorbed up-projections) vs an expanded per-head
key/value cache vs no cache (full forward per token), and at batch 1 self-speculative decoding (the MTP block
drafts 1, 2, 3 tokens per step by chaining itself, the main model verifies them in one forward), side by side in
one run.

    python launch/bench.py decode [--model tiny | --checkpoint PATH] [--contexts 256 1024 4096] [--batches 1 8]
                                  [--steps 32] [--rounds 5] [--text FILE ...]
                                  [--speculative-models tiny small] [--draft-tokens 1 2 3] [--draft-vocab N]

With --checkpoint the contexts are real text (by default this repository's gpt_moe/**/*.py sources, which the
built-in corpus does not contain) and the speculative table gives the measured acceptance of the MTP drafts.
A model of --speculative-models (presets) has random weights: its MTP block predicts nothing (acceptance ~0), so
its rows measure what a speculative step costs on that preset (the draft's passes and the verifying forward over
k+1 positions, in plain steps); the speed-up such a model would reach at the accepted length measured on the
checkpoint, in the same run, is printed as a projection (cost measured, acceptance borrowed: say so).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from timing import interleaved_medians

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.params import account
from gpt_moe.serve.generate import DecodeStats, SamplingConfig, SelfSpeculativeDecoder
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
    logits, _ = model.decode_step(context, caches, last_logits=1)
    first = logits[:, -1:].argmax(-1)

    def run() -> None:
        for cache in caches:
            cache.length = context.shape[1]
        next_ids = first
        for _ in range(steps):
            logits, _ = model.decode_step(next_ids, caches)
            next_ids = logits[:, -1:].argmax(-1)
    return run


def speculative_decoder(model: DeepSeekForCausalLM, context: torch.Tensor, steps: int, draft_tokens: int,
                        draft_vocab: int | None) -> tuple:
    """(run, stats, draft): `run` greedily decodes at least `steps` tokens after `context` [1, len] with a
    `SelfSpeculativeDecoder` drafting `draft_tokens` per step, prefilled once and restored to the context before
    every call; `stats` holds the last run's `DecodeStats` (greedy: the same every run); `draft` runs `steps` single
    draft passes of the MTP block (its pass and its head) from the same state."""
    sampling = SamplingConfig(max_new_tokens=steps, temperature=0.0, top_k=0, top_p=1.0, draft_tokens=draft_tokens,
                              draft_vocab=draft_vocab)
    speculative = SelfSpeculativeDecoder(model, sampling, context.shape[1] + steps + draft_tokens + 1)
    speculative.prefill(context)
    start = speculative.snapshot()
    stats = DecodeStats()

    def run() -> None:
        speculative.restore(start)
        speculative.stats = stats
        stats.__init__()
        emitted = 0
        while emitted < steps:
            emitted += len(speculative.step())

    def draft() -> None:
        for _ in range(steps):
            speculative.restore(start)
            speculative.draft(1)
    return run, stats, draft


def load_model(args: argparse.Namespace, dtype: torch.dtype) -> tuple[DeepSeekForCausalLM, object]:
    """(model, tokenizer or None): the checkpoint's trained weights, or random ones of --model."""
    if args.checkpoint:
        from gpt_moe.checkpoint.loading import load_for_inference

        loaded = load_for_inference(args.checkpoint)
        return loaded.model.to(dtype).eval(), loaded.tokenizer
    return random_model(args.model, dtype), None


def random_model(preset: str, dtype: torch.dtype) -> DeepSeekForCausalLM:
    return DeepSeekForCausalLM(ModelConfig.load(preset), seed=0).to(dtype).eval()


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
    parser.add_argument("--speculative-contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--speculative-models", nargs="*", default=None, metavar="PRESET",
                        help="presets (random weights) whose speculative step cost is measured beside the "
                             "checkpoint or --model (default: none besides it)")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3],
                        help="drafts per speculative step to compare (the MTP block chained this many times)")
    parser.add_argument("--draft-vocab", type=int, default=None,
                        help="the drafts are scored over the first N ids of the head (default: all)")
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
    for batch in args.batches:
        for context_len in args.contexts:
            context = contexts(tokenizer, args, config.vocab_size, batch, context_len)
            rates = measure(model, context, args)
            latent, expanded = rates["latent"], rates["expanded"]
            none_text, ratio_text = (f"{rates['none']:15.1f}", f"{latent / rates['none']:15.1f}x") \
                if "none" in rates else (f"{'-':>15}", f"{'-':>16}")
            print(f"{batch:5d} {context_len:7d} {latent:13.1f} {expanded:15.1f} {none_text} "
                  f"{latent / expanded:15.2f}x {ratio_text}")
    speculative_section(args, dtype, model, tokenizer)
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


# ------------------------------------------------------------------ self-speculative decoding, batch 1
@dataclasses.dataclass
class SpeculativeRow:
    """One model at one context length: plain and speculative (by drafts per step) measured side by side."""

    model: str
    weights: str
    context: int
    plain: float  # latent-cache tokens/s
    draft_cost: float  # one draft pass (the MTP block and its head) in plain steps
    rates: dict[int, float]  # drafts per step -> speculative tokens/s
    stats: dict[int, DecodeStats]  # drafts per step -> summed over the contexts

    def step_cost(self, k: int) -> float:
        """What one speculative step (k draft passes and the verifying forward over k+1 positions) costs, in
        plain steps: speed-up = tokens per forward / step cost."""
        return self.stats[k].accepted_length * self.plain / self.rates[k]


def speculative_section(args: argparse.Namespace, dtype: torch.dtype, model: DeepSeekForCausalLM,
                        tokenizer) -> None:
    """The batch-1 speculative table: the checkpoint (or --model) and each of --speculative-models."""
    label = model.config.name
    models = [(label, args.checkpoint or "random weights", model, tokenizer)]
    models += [(preset, "random weights", None, None) for preset in args.speculative_models or ()
               if args.checkpoint or preset != args.model]
    rows = []
    for name, weights, candidate, text in models:
        candidate = candidate if candidate is not None else random_model(name, dtype)
        if candidate.model.mtp_layer is None:
            print(f"\n{name}: no MTP block, no speculative decoding")
            continue
        for context_len in args.speculative_contexts:
            samples = contexts(text, args, candidate.config.vocab_size, args.samples, context_len, spread=True)
            rows.append(measure_speculative(candidate, samples, args, (name, weights, context_len)))
    print_speculative(rows, args)


def measure_speculative(model: DeepSeekForCausalLM, samples: torch.Tensor, args: argparse.Namespace,
                        where: tuple[str, str, int]) -> SpeculativeRow:
    """Batch 1, each of the contexts `samples` [n, len] in turn: plain latent-cache decoding, speculative decoding
    with each of --draft-tokens, and single draft passes, timed in interleaved rounds."""
    runs, stats = {}, {k: [] for k in args.draft_tokens}
    with torch.no_grad():
        for i, row in enumerate(samples):  # per context, all take turns: a burst of load hits them alike
            runs[("plain", i)] = decoder(model, row[None], args.steps, "latent")
            for k in args.draft_tokens:
                runs[(k, i)], row_stats, draft = speculative_decoder(model, row[None], args.steps, k, args.draft_vocab)
                stats[k].append(row_stats)
            runs[("draft", i)] = draft
        seconds = interleaved_medians(runs, args.rounds, warmup=1)
    total = {kind: sum(t for (name, _), t in seconds.items() if name == kind) for kind in ("plain", "draft",
                                                                                          *args.draft_tokens)}
    plain_tokens = len(samples) * args.steps
    summed = {k: merged(stats[k]) for k in args.draft_tokens}
    return SpeculativeRow(*where, plain=plain_tokens / total["plain"], draft_cost=total["draft"] / total["plain"],
                          rates={k: summed[k].tokens / total[k] for k in args.draft_tokens}, stats=summed)


def merged(parts: list[DecodeStats]) -> DecodeStats:
    """The sum of several generations' statistics (`tokens` counts the tokens the steps produced)."""
    total = DecodeStats()
    for part in parts:
        for name in ("drafted", "accepted", "forwards"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.tokens += part.accepted + part.forwards
        for mine, theirs in ((total.reached, part.reached), (total.accepted_at, part.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, count in enumerate(theirs):
                mine[j] += count
    return total


def print_speculative(rows: list[SpeculativeRow], args: argparse.Namespace) -> None:
    """The table; for a random-weight preset, the speed-up projected at the trained model's accepted length."""
    if not rows:
        return
    vocab = f"the first {args.draft_vocab} ids" if args.draft_vocab else "the whole vocabulary"
    print(f"\nself-speculative decoding, batch 1, greedy ({args.steps}+ new tokens after each of {args.samples} "
          f"contexts; the tokens of plain greedy; drafts scored over {vocab})")
    print(f"{'model':<8} {'weights':<16} {'context':>7} {'latent tok/s':>12} {'draft pass':>10} {'k':>2} "
          f"{'spec tok/s':>10} {'speculative/latent':>18} {'acceptance by draft':>20} {'tok/forward':>11} "
          f"{'step cost':>9} {f'needed for {TARGET}x':>16}  projected")
    trained = {row.context: row for row in rows if row.weights != "random weights"}
    for row in rows:
        for k in args.draft_tokens:
            stats, cost = row.stats[k], row.step_cost(k)
            by_draft = "/".join(f"{a:.0%}" for a in stats.acceptance_by_position()) or "-"
            reference = trained.get(row.context)
            projected = "-"
            if row.weights == "random weights" and reference is not None:
                length = reference.stats[k].accepted_length
                projected = f"{length / cost:.2f}x at {reference.weights}'s {length:.2f} tok/forward"
            first = k == args.draft_tokens[0]
            print(f"{row.model if first else '':<8} {row.weights if first else '':<16} "
                  f"{row.context if first else '':>7} {f'{row.plain:.1f}' if first else '':>12} "
                  f"{f'{row.draft_cost:.2f}' if first else '':>10} {k:2d} {row.rates[k]:10.1f} "
                  f"{row.rates[k] / row.plain:17.2f}x {by_draft:>20} {stats.accepted_length:11.2f} {cost:9.2f} "
                  f"{TARGET * cost:16.2f}  {projected}")
    print("draft pass: one pass of the MTP block and its head, in plain steps; step cost: a speculative step (k "
          "draft passes, the verifying forward over k+1 positions, the rollback) in plain steps; speed-up = "
          "tok/forward / step cost; needed: the tok/forward that step cost needs for the target")


if __name__ == "__main__":
    raise SystemExit(main())
