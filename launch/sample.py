"""Generate text from a checkpoint in the terminal, streamed to stdout.

    python launch/sample.py --checkpoint PATH --max-new-tokens N [--temperature T] [--top-k K] [--top-p P]
                            [--seed S] [--repetition-penalty R] [--stop STR ...] [--chat [--system TEXT]]
                            [--speculative [--draft-tokens K] [--draft-vocab N]] [PROMPT]

PROMPT comes from the argument or, when absent, from stdin; only the generated text is printed.
Plain mode continues the prompt as a document (stops at <|endoftext|>); chat mode wraps it as a user
turn of the chat template and prints the assistant's reply (stops at <|end|>). A model with a published
model's tokenizer (a transformers directory, or fine-tuned from one) uses that model's own chat template, BOS,
end-of-turn and EOS tokens. The default follows the
checkpoint (chat for a model fine-tuned on conversations); --chat / --no-chat choose. --speculative drafts
with the model's MTP block (K tokens per step, the block chained) and verifies with the main model (same tokens
greedily, same distribution when sampling) and prints the draft acceptance and tokens per forward on stderr.
Without --checkpoint: the newest complete checkpoint under runs/. Errors print one line and exit 2. Replies come
from the functions the app uses (`gpt_moe.serve.chat.generate_reply` / `generate_continuation`), with
`SamplingConfig`'s defaults.
"""

from __future__ import annotations

import argparse
import math
import sys

from gpt_moe.cli import run_cli
from gpt_moe.errors import ConfigError, DataError
from gpt_moe.serve.chat import generate_continuation, generate_reply, load_chat_model
from gpt_moe.serve.generate import SamplingConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = SamplingConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    parser.add_argument("--checkpoint", help="run, checkpoints/step_*, exported or transformers model directory "
                                             "(default: the newest complete checkpoint under runs/)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None, help="makes the output reproducible")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop before this string (repeatable)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="apply the chat template and print the reply (--no-chat: continue the text); default: "
                             "chat for a model fine-tuned on conversations, continuation for a base model")
    parser.add_argument("--system", default="", help="system message for --chat")
    parser.add_argument("--speculative", action="store_true",
                        help="self-speculative decoding: the checkpoint's MTP block drafts the tokens after next")
    parser.add_argument("--draft-tokens", type=int, default=defaults.draft_tokens, metavar="K",
                        help="--speculative: drafts per step (the MTP block chained K times, verified in one forward)")
    parser.add_argument("--draft-vocab", type=int, default=defaults.draft_vocab, metavar="N",
                        help="--speculative: draft from the first N token ids only (a cheaper draft over a large "
                             "vocabulary; default: all)")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Sampling options in range, or DataError naming the option."""
    problems = [(0 <= args.temperature < math.inf, f"--temperature {args.temperature}: expected a number >= 0"),
                (args.top_k >= 0, "--top-k must be >= 0"),
                (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                (0 < args.repetition_penalty < math.inf, "--repetition-penalty must be a number > 0"),
                (all(args.stop), "--stop needs a non-empty string"),
                (args.draft_tokens >= 1, f"--draft-tokens {args.draft_tokens}: expected 1 or more"),
                (args.draft_vocab is None or args.draft_vocab >= 1,
                 f"--draft-vocab {args.draft_vocab}: expected 1 or more")]
    for ok, message in problems:
        if not ok:
            raise DataError(message)


def run(args: argparse.Namespace) -> None:
    check(args)
    if args.prompt is None and sys.stdin.isatty():
        print("(reading the prompt from stdin; end it with Ctrl-D)", file=sys.stderr)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise DataError("empty prompt: pass PROMPT or pipe text on stdin")
    loaded = load_chat_model(args.checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                         stop=tuple(args.stop), speculative=args.speculative, draft_tokens=args.draft_tokens,
                         draft_vocab=args.draft_vocab)
    if args.speculative and model.model.mtp_layer is None:
        raise ConfigError(f"--speculative: {args.checkpoint or 'the checkpoint'} has no MTP block "
                          "(num_nextn_predict_layers 0) to draft with; drop --speculative")
    if args.chat if args.chat is not None else loaded.training.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        reply = generate_reply(model, tokenizer, [*system, {"role": "user", "content": prompt}], sampling)
    else:
        reply = generate_continuation(model, tokenizer, prompt, sampling)
    for piece in reply:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.speculative:
        stats = reply.stats
        print(f"speculative: {stats.tokens} tokens, {stats.draft_summary()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        try:
            run(parse_args(argv))
        except BrokenPipeError:  # `| head`: the reader is gone
            sys.stderr.close()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
