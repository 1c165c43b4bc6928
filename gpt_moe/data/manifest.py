"""The prepared-dataset format: manifest.json and what it says about the shards beside it.

A prepared directory (written by `python -m data_prep`) holds

    manifest.json        format version, tokenizer identity, dtype, per split: documents,
                         tokens and the shard list (file, token count, sha256, largest token id)
    tokenizer.tiktoken   the tokenizer's BPE ranks (see gpt_moe.data.tokenizer)
    train_00000.bin ...  raw little-endian token ids, uint16 when n_vocab <= 65536 else
    val_00000.bin ...    uint32; every document is followed by <|endoftext|>

Chat data (`python -m data_prep --format chat`, manifest `"content": "chat"`) holds conversations as its
documents, each `gpt_moe.data.chat_template.render_conversation(tokenizer, messages)` ids followed by one <|endoftext|>,
never across two shards, and beside every token shard `X.bin` a loss-mask shard

    train_00000.mask.bin ...  uint8, one byte per token of X.bin: 1 = the model is trained to produce this
                              token (assistant text and its <|end|>), 0 = not (system and user turns, role
                              markers, the <|endoftext|> after each conversation)

recorded per shard as `mask_file` and `mask_sha256`, and a manifest `chat` section (`ChatInfo`: the template's
sha256, --max-seq-len, per split conversations / tokens / trained tokens, bad rows skipped by kind).

Chat data in a published model's tokenizer is rendered with that model's own chat template, which may close turns
with the very token that ends a conversation (DeepSeek ends every assistant turn with its EOS): there the
end-of-text closing each conversation has mask value 2 (`CONVERSATION_END`, not trained) and the `chat` section
says `"ends_marked": true`, so readers find conversations by the mark instead of by the token.
`TokenShards.masks(split)` reads the mask shards aligned one-to-one with `TokenShards.tokens(split)`.

The manifest is written last: a directory without one is incomplete.

The reader and the batch samplers are in `gpt_moe.data.shards`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from gpt_moe.data.tokenizer import TokenizerInfo
from gpt_moe.errors import DataError

FORMAT = "gpt-moe-token-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"  # present while data_prep has not finished
CONTENTS = ("text", "chat")
MASK_DTYPE = np.dtype("u1")
"""Loss-mask shards of chat data: one byte per token, 1 = trained."""
CONVERSATION_END = 2
"""Mask value of the end-of-text token that closes a conversation, in chat data whose `ChatInfo.ends_marked`."""
PREPARE_HINT = "hint: run python -m data_prep with --out pointing at this directory"
SPLITS = ("train", "val")
"""The splits data_prep writes, in this order; a split may be empty ("val" with --val-fraction 0)."""
DEFAULT_DATA_DIR = "data/builtin"
"""Where `python -m data_prep` puts the built-in corpus and where training looks for data by default."""
DEFAULT_CHAT_DATA_DIR = "data/chat-builtin"
"""Where `python -m data_prep --format chat --source builtin-chat` puts the built-in conversations: the default
data of a fine-tuning run (--init-from)."""


def prepare_command(manifest: Manifest, directory: str | Path) -> str:
    """The `python -m data_prep` command that made `directory`: the arguments its manifest records."""
    words = ["python", "-m", "data_prep"]
    for key, value in manifest.args.items():
        if value is None:
            continue
        flag = "--source" if key == "sources" else "--" + key.replace("_", "-")
        words += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return shlex.join([*words, "--out", str(directory)])


def repair_hint(manifest: Manifest, directory: str | Path) -> str:
    """The hint for damaged or missing shards: data_prep with the same arguments rebuilds them."""
    return f"hint: rerun `{prepare_command(manifest, directory)}` (the same arguments): it rebuilds damaged shards"


def dtype_for_vocab(n_vocab: int) -> np.dtype:
    """Little-endian uint16 when every id fits (n_vocab <= 65536), else uint32."""
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: name relative to the dataset directory, token count, sha256 of its bytes, and its
    largest token id (None in manifests written before it was recorded; -1 for an empty shard). Chat data
    adds the shard's loss-mask file (`tokens` bytes of uint8) and its sha256; None for text data."""

    file: str
    tokens: int
    sha256: str
    max_token_id: int | None = None
    mask_file: str | None = None
    mask_sha256: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ShardInfo:
        """From its JSON form; KeyError, TypeError or ValueError when malformed."""
        found, mask = data.get("max_token_id"), data.get("mask_file")
        return cls(str(data["file"]), int(data["tokens"]), str(data["sha256"]), None if found is None else int(found),
                   None if mask is None else str(mask), None if mask is None else str(data["mask_sha256"]))

    def to_dict(self) -> dict:
        """The JSON form (text data: without the mask fields, as before chat data existed)."""
        data = asdict(self)
        if self.mask_file is None:
            del data["mask_file"], data["mask_sha256"]
        return data

    def files(self, itemsize: int) -> list[tuple[str, int, str]]:
        """(file, expected size in bytes, sha256) of the token shard (`itemsize` bytes per token) and, for chat
        data, of its mask shard (one byte per token)."""
        files = [(self.file, self.tokens * itemsize, self.sha256)]
        if self.mask_file is not None:
            files.append((self.mask_file, self.tokens * MASK_DTYPE.itemsize, str(self.mask_sha256)))
        return files


@dataclass(frozen=True)
class SplitInfo:
    """A split's totals and shards in stream order (documents count those with >= 1 token here)."""

    documents: int = 0
    tokens: int = 0
    shards: tuple[ShardInfo, ...] = ()

    def to_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "shards": [s.to_dict() for s in self.shards]}


@dataclass(frozen=True)
class ChatSplit:
    """A chat split's totals: conversations, tokens (end-of-text tokens included) and trained tokens (mask 1)."""

    conversations: int = 0
    tokens: int = 0
    trained_tokens: int = 0


@dataclass(frozen=True)
class ChatInfo:
    """The manifest's `chat` section: the template identity (`gpt_moe.data.chat_template.template_sha256`), the
    --max-seq-len conversations were held to (in tokens, the end-of-text included), per-split totals, and the
    bad rows skipped: a count per kind (every kind present, 0 when none) and the first few `where: problem`;
    `ends_marked`: each conversation's closing end-of-text has mask `CONVERSATION_END` (written only when true)."""

    template_sha256: str
    max_seq_len: int
    splits: dict[str, ChatSplit] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_first: dict[str, list[str]] = field(default_factory=dict)
    ends_marked: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.ends_marked:  # as before the mark existed
            del data["ends_marked"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ChatInfo:
        """From its JSON form; KeyError, TypeError, ValueError or AttributeError when malformed."""
        return cls(template_sha256=str(data["template_sha256"]), max_seq_len=int(data["max_seq_len"]),
                   splits={str(k): ChatSplit(**{f: int(v[f]) for f in ("conversations", "tokens", "trained_tokens")})
                           for k, v in data["splits"].items()},
                   skipped={str(k): int(v) for k, v in data["skipped"].items()},
                   skipped_first={str(k): [str(w) for w in v] for k, v in data.get("skipped_first", {}).items()},
                   ends_marked=bool(data.get("ends_marked", False)))


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a prepared directory.

    `args` holds the data_prep options that determine the output (everything except the
    worker count and the output path, so that the bytes do not depend on them). `parts` is
    data_prep's own record of where each part of its output stream ends (readers ignore it;
    data_prep re-encodes a damaged shard from there, see `data_prep.manifest`); manifests
    written before it have none. `content` is "text" or "chat" (then every shard has a mask file and
    `chat` is set; see the module docstring).
    """

    created_at: str
    source: str
    args: dict
    tokenizer: TokenizerInfo
    dtype: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    parts: tuple[dict, ...] = ()
    content: str = "text"
    chat: ChatInfo | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {"format": self.format, "format_version": self.format_version, "created_at": self.created_at,
                "source": self.source, "args": self.args, "tokenizer": self.tokenizer.to_dict(),
                "dtype": self.dtype, "splits": {name: split.to_dict() for name, split in self.splits.items()},
                "parts": list(self.parts)}
        if self.content != "text":  # text manifests stay as they were before chat data existed
            data = {**data, "content": self.content, "chat": self.chat.to_dict() if self.chat else None}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def content_sha256(self) -> str:
        """sha256 of the manifest without its creation time: the same for two preparations of the same bytes (its
        shards' sha256 and the tokenizer's are in it), as nodes that each prepare their own copy must have."""
        return hashlib.sha256(replace(self, created_at="").to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e}); {PREPARE_HINT}") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise DataError(f"{where}: not a {FORMAT} manifest (format={found!r}); {PREPARE_HINT}")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{where}: format_version {data.get('format_version')!r}, this reader expects "
                            f"{FORMAT_VERSION}; {PREPARE_HINT}")
        try:
            splits = {name: SplitInfo(documents=int(s["documents"]), tokens=int(s["tokens"]),
                                      shards=tuple(ShardInfo.from_dict(x) for x in s["shards"]))
                      for name, s in data["splits"].items()}
            parts = data.get("parts")
            content, chat = data.get("content", "text"), data.get("chat")
            manifest = cls(created_at=str(data["created_at"]), source=str(data["source"]), args=dict(data["args"]),
                           tokenizer=TokenizerInfo.from_dict(data["tokenizer"], where), dtype=str(data["dtype"]),
                           splits=splits, parts=tuple(parts) if isinstance(parts, list) else (), content=content,
                           chat=None if chat is None else ChatInfo.from_dict(chat))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e}); {PREPARE_HINT}") from None
        if manifest.dtype not in ("uint16", "uint32"):
            raise DataError(f"{where}: dtype {manifest.dtype!r}, expected uint16 or uint32; {PREPARE_HINT}")
        manifest.check_content(where)
        return manifest

    def check_content(self, where: str) -> None:
        """DataError unless `content` is known and agrees with the `chat` section and the shards' mask files."""
        if self.content not in CONTENTS:
            raise DataError(f"{where}: content {self.content!r}, expected one of {', '.join(CONTENTS)}; "
                            f"{PREPARE_HINT}")
        chat = self.content == "chat"
        for split in self.splits.values():
            for shard in split.shards:
                if (shard.mask_file is not None) != chat:
                    raise DataError(f"{where}: shard {shard.file} {'has no' if chat else 'has a'} mask_file in "
                                    f"{self.content} data; {PREPARE_HINT}")
        if chat and self.chat is None:
            raise DataError(f"{where}: chat data without a chat section; {PREPARE_HINT}")

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            unfinished = (Path(directory) / PROGRESS_FILE).is_file() or any(Path(directory).glob("*.bin"))
            state = " (preparation incomplete: rerun the same data_prep command to resume)" if unfinished else ""
            raise DataError(f"{path}: no manifest{state}; {PREPARE_HINT}")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))
