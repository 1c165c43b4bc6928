"""python -m data_prep: turn a text corpus, or conversations (--format chat), into token shards for training.

examples:
  python -m data_prep                        # the offline default: builtin corpus, bpe:4096 -> data/builtin
  python -m data_prep --source hf:roneneldan/TinyStories --tokenizer bpe:8192 --out data/tinystories
  python -m data_prep --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer cl100k_base \\
      --max-tokens 2B --out data/fineweb-edu
  python -m data_prep --source 'corpus/*.jsonl' --text-field content --out data/mine
  python -m data_prep --format chat --source builtin-chat --tokenizer-from data/builtin --out data/chat-builtin
  python -m data_prep --format chat --source hf:HuggingFaceTB/smoltalk:all --tokenizer-from runs/tiny \\
      --max-seq-len 1024 --out data/smoltalk

Running the same command again resumes an interrupted run, or verifies a finished one and rebuilds
only its damaged or missing shards.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from data_prep.pipeline import DEFAULT_CHAT_OUT, DEFAULT_OUT, DEFAULT_TOKENIZER, FORMATS, PrepareConfig, prepare
from data_prep.sources import CHAT_BUILTIN
from gpt_moe.cli import EXIT_BAD_INPUT, run_cli

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
MAX_COUNT = 2**63 - 1  # the largest count an int64 holds


def _count_problem(value: float | None) -> str:
    """Why a parsed count is not one ("" when it is)."""
    if value is None or value < 0:
        return "not a count"
    if not math.isfinite(value):
        return "not finite"
    if value != int(value):
        return "not a whole number"
    return "too large" if value > MAX_COUNT else ""


def count(text: str) -> int:
    """A whole, finite count from 0 to 2^63 - 1, optionally with a k/M/B suffix: 500k, 20M, 1.5B."""
    text = text.strip().replace("_", "")
    scale = _SUFFIXES.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1]) * scale if scale != 1 else int(text)
    except ValueError:
        value = None
    if problem := _count_problem(value):
        raise argparse.ArgumentTypeError(f"{text!r} is {problem}; expected a whole number of at most 2^63 - 1, "
                                         "e.g. 5000000, 500k, 20M, 1.5B")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: ...` on stderr and exit 2, without the usage block."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message}; hint: python -m data_prep --help lists the options\n")


def _parser() -> _Parser:
    parser = _Parser(prog="python -m data_prep", description=__doc__.split(":", 1)[1].strip(),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=None, metavar="SOURCE",
                        help="builtin (default) | builtin-chat (with --format chat) | hf:NAME[:CONFIG][@SPLIT] | "
                             ".txt/.jsonl/.json/.parquet files, dirs or globs")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text (default): documents; chat: conversations, with a loss mask beside every shard")
    parser.add_argument("--tokenizer", default=None,
                        help=f"bpe:N (train N tokens on the corpus; default {DEFAULT_TOKENIZER} for text) | "
                             "cl100k_base | o200k_base | gpt2 | PATH.tiktoken")
    parser.add_argument("--tokenizer-from", default=None, metavar="DIR",
                        help="copy the tokenizer of a prepared data directory, a training run or checkpoint, or an "
                             "export (what chat data for fine-tuning that model needs)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default {DEFAULT_OUT} for --source builtin, {DEFAULT_CHAT_OUT} for "
                             f"--source {CHAT_BUILTIN}; required otherwise)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: the CPU count)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation (default 0.01)")
    parser.add_argument("--max-tokens", type=count, default=None,
                        help="stop after exactly this many tokens, e.g. 20M (chat: before the conversation that "
                             "would pass it; default: no cap)")
    parser.add_argument("--text-field", default="text",
                        help="column holding the text in jsonl/parquet/hf rows (default text)")
    parser.add_argument("--messages-field", default="messages",
                        help="chat: column holding the list of {role, content} messages (default messages; rows "
                             "with prompt and completion instead are read as one user and one assistant turn)")
    parser.add_argument("--max-seq-len", type=count, default=PrepareConfig.max_seq_len,
                        help="chat: skip conversations longer than this many tokens, end-of-text included "
                             "(default 2048)")
    parser.add_argument("--strict", action="store_true",
                        help="chat: stop at the first bad row instead of skipping and counting it")
    parser.add_argument("--shard-tokens", type=count, default=PrepareConfig.shard_tokens,
                        help="tokens per part (a train and a val shard), the unit of resuming (default 2^24)")
    parser.add_argument("--bpe-sample-chars", type=count, default=PrepareConfig.bpe_sample_chars,
                        help="bpe:N trains on the first this many characters (default 2^25)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> PrepareConfig:
    parser = _parser()
    args = parser.parse_args(argv)
    sources = args.source or ([CHAT_BUILTIN] if args.format == "chat" else ["builtin"])
    out = args.out
    if out is None:
        defaults = {("builtin",): DEFAULT_OUT, (CHAT_BUILTIN,): DEFAULT_CHAT_OUT}
        if tuple(sources) not in defaults:
            parser.exit(2, f"error: --out DIR is required when --source is not builtin or {CHAT_BUILTIN}\n")
        out = defaults[tuple(sources)]
    return PrepareConfig(sources=tuple(sources), tokenizer=args.tokenizer, out=out, workers=args.workers,
                         val_fraction=args.val_fraction, max_tokens=args.max_tokens, text_field=args.text_field,
                         shard_tokens=args.shard_tokens, bpe_sample_chars=args.bpe_sample_chars,
                         progress_bar=not args.no_progress, format=args.format, tokenizer_from=args.tokenizer_from,
                         messages_field=args.messages_field, max_seq_len=args.max_seq_len, strict=args.strict)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    return run_cli(lambda: run(config), interrupted_hint=f"run the same command again to resume into {config.out}")


def run(config: PrepareConfig) -> None:
    result = prepare(config)
    if result.rebuilt:
        rebuilt = ", ".join(f"{name} ({problem})" for name, problem in result.rebuilt)
        print(f"{result.out}: rebuilt {len(result.rebuilt)} damaged or missing file(s): {rebuilt}; "
              "the dataset is whole again")
    elif result.already_prepared:
        print(f"{result.out} is already prepared; nothing to do")
    elif result.manifest.chat is not None:
        chat = result.manifest.chat
        train, val, skipped = chat.splits["train"], chat.splits["val"], sum(chat.skipped.values())
        print(f"prepared {result.out}: {train.conversations:,} train + {val.conversations:,} val conversations "
              f"({train.tokens:,} + {val.tokens:,} tokens, {train.trained_tokens:,} + {val.trained_tokens:,} "
              f"trained), {skipped:,} bad rows skipped, tokenizer {result.manifest.tokenizer.name}")
    else:
        print(f"prepared {result.out}: {result.manifest.splits['train'].tokens:,} train + "
              f"{result.manifest.splits['val'].tokens:,} val tokens, tokenizer {result.manifest.tokenizer.name}")


if __name__ == "__main__":
    sys.exit(main())
