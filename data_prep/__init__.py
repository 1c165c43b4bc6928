"""data_prep: turn a text corpus (or conversations, `--format chat`) into token shards for training
(`python -m data_prep --help`).

Modules, one concept each: `sources` (where documents come from), `chat_rows` (where conversations
come from, and which rows are bad), `builtin_chat` (the built-in offline conversations), `encode` (cutting
documents into pieces and tokenizing them in parallel, in order), `build_tokenizer`
(a standard encoding, a file, or `bpe:N` trained in a child process), `shards` (the
train/val assignment and atomic shard files), `manifest` (the output directory's
state: progress, resume, manifest), `lock` (one run per output directory), `pipeline`
(one run, wiring them together: `prepare()`).
The format of the output is defined and read by `gpt_moe.data`.
"""

from data_prep.pipeline import (DEFAULT_CHAT_OUT, DEFAULT_OUT, PrepareConfig, PrepareResult, prepare, prepare_default,
                                prepare_default_chat)

__all__ = ["DEFAULT_CHAT_OUT", "DEFAULT_OUT", "PrepareConfig", "PrepareResult", "prepare", "prepare_default",
           "prepare_default_chat"]
