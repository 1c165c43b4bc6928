"""What every tokenizer shares, ours or a published model's: the interface the code uses (`Tokenizer`), the identity
record kept in shard manifests and checkpoints (`TokenizerInfo`), and the two BPE file formats both kinds read (the
tiktoken rank file, HF's byte-level alphabet).

Two kinds of tokenizer sit behind `Tokenizer`:

- ours (`gpt_moe.data.tokenizer`): a `tiktoken.Encoding` with `<|endoftext|>` and the chat markers, saved as one
  tiktoken-format file (`format` "tiktoken");
- a published model's own (`gpt_moe.data.published_tokenizer`): a transformers directory's `tokenizer.json`
  (`format` "tokenizer.json") or tiktoken-format `tiktoken.model` (`format` "tiktoken.model"), kept as the files
  the model ships (`files`: name -> sha256, copied unchanged into data directories, checkpoints and exports).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from gpt_moe.atomic import write_atomic
from gpt_moe.errors import DataError

TOKENIZER_FILE = "tokenizer.tiktoken"
"""File name of our tokenizer saved beside the shards of a prepared dataset."""
OURS = "tiktoken"
"""`TokenizerInfo.format` of our tokenizers (one tiktoken-format file)."""


class Tokenizer(Protocol):
    """The tokenizer methods the code uses (data_prep, the chat template, the sampler, the app, the evaluator).
    `tiktoken.Encoding` has them; `gpt_moe.data.published_tokenizer.PublishedTokenizer` adapts a published one."""

    name: str

    @property
    def n_vocab(self) -> int:
        """One more than the largest token id."""

    @property
    def special_tokens_set(self) -> set[str]:
        """The special tokens' text (never produced by `encode_ordinary`)."""

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` as plain text: text that spells a special token stays text."""

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        """The id of one token (a special token by its text); KeyError when there is none."""

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one token."""

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (invalid UTF-8 replaced)."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What identifies a tokenizer: stored in shard manifests and checkpoints.

    Ours (`format` "tiktoken"): `sha256` is the hash of the tiktoken-format file of the mergeable ranks (`file`,
    relative to the directory that holds it); `pat_str` and `special_tokens` complete the definition, so the file
    and this record rebuild the exact Encoding offline.

    A published model's (`format` "tokenizer.json" or "tiktoken.model"): `files` maps each tokenizer file the model
    ships (tokenizer.json or tiktoken.model, tokenizer_config.json, chat_template.jinja, ...) to its sha256, and
    `sha256` hashes those pairs (`files_sha256`); `file` is the vocabulary file, `eot_id` the model's EOS token,
    `document_prefix` the ids its tokenizer puts before a text (DeepSeek's BOS) and `pat_str` the split pattern of a
    tiktoken.model ("" for tokenizer.json, which holds its own). Records of ours are written without these fields,
    as before they existed.
    """

    name: str
    sha256: str
    n_vocab: int
    eot_id: int
    pat_str: str
    special_tokens: dict[str, int] = field(default_factory=dict)
    file: str = TOKENIZER_FILE
    format: str = OURS
    files: dict[str, str] = field(default_factory=dict)
    document_prefix: tuple[int, ...] = ()

    @property
    def published(self) -> bool:
        """A published model's own tokenizer (not one of ours)."""
        return self.format != OURS

    def file_hashes(self) -> dict[str, str]:
        """Every file of the tokenizer -> its sha256 (ours: the one tiktoken file)."""
        return dict(self.files) if self.published else {self.file: self.sha256}

    def describe(self) -> str:
        """For model cards and messages: name, size and files."""
        files = ", ".join(f"`{name}`" for name in self.file_hashes())
        what = "the published model's own files" if self.published else "tiktoken file"
        return f"{self.name} ({self.n_vocab} tokens, {what} {files})"

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.published:  # records of ours stay as they were
            for key in ("format", "files", "document_prefix"):
                del data[key]
        else:
            data["document_prefix"] = list(self.document_prefix)
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "tokenizer record") -> TokenizerInfo:
        try:
            return cls(name=str(data["name"]), sha256=str(data["sha256"]), n_vocab=int(data["n_vocab"]),
                       eot_id=int(data["eot_id"]), pat_str=str(data["pat_str"]),
                       special_tokens={str(k): int(v) for k, v in data["special_tokens"].items()},
                       file=str(data.get("file", TOKENIZER_FILE)), format=str(data.get("format", OURS)),
                       files={str(k): str(v) for k, v in data.get("files", {}).items()},
                       document_prefix=tuple(int(i) for i in data.get("document_prefix", ())))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed tokenizer entry ({type(e).__name__}: {e}); "
                            "expected name, sha256, n_vocab, eot_id, pat_str, special_tokens; "
                            "hint: prepare the data again with python -m data_prep") from None


def copy_tokenizer_files(info: TokenizerInfo, source: Path, destination: Path) -> None:
    """Copy every file of the tokenizer (`file_hashes`) unchanged from `source` to `destination`, each atomically."""
    for name in info.file_hashes():
        write_atomic(Path(destination) / name, (Path(source) / name).read_bytes())


def files_sha256(files: dict[str, str]) -> str:
    """The identity of a set of files: sha256 over their `name sha256` lines in name order."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------- tiktoken file format


def tiktoken_file_bytes(ranks: dict[bytes, int]) -> bytes:
    """The canonical tiktoken-format file: `base64(token) rank` lines in rank order."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode() for token, rank in sorted(ranks.items(),
                                                                                            key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


def parse_tiktoken_file(data: bytes, where: str) -> dict[bytes, int]:
    """Inverse of `tiktoken_file_bytes` (also reads the published `.tiktoken` and `tiktoken.model` files)."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise DataError(f"{where}:{lineno}: expected 'base64-token rank', got {line[:60]!r}; "
                            "hint: the file is not a tiktoken BPE file") from None
    if len(set(ranks.values())) != len(ranks):
        raise DataError(f"{where}: duplicate ranks; hint: the file is not a tiktoken BPE file")
    return ranks


def byte_level_alphabet() -> dict[str, int]:
    """HF ByteLevel's printable stand-in character for each byte -> that byte.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 are
    mapped, in byte order, to U+0100 onwards (the GPT-2 byte encoder's convention).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    mapping: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping
