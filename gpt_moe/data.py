"""Token shards: the prepared-dataset format, its reader and the batch samplers.

A prepared directory (written by `python -m data_prep`) holds

    manifest.json        format version, tokenizer identity, dtype, per split: documents,
                         tokens and the shard list (file, token count, sha256, largest token id)
    tokenizer.tiktoken   the tokenizer's BPE ranks (see gpt_moe.tokenizer)
    train_00000.bin ...  raw little-endian token ids, uint16 when n_vocab <= 65536 else
    val_00000.bin ...    uint32; every document is followed by <|endoftext|>

Chat data (`python -m data_prep --format chat`, manifest `"content": "chat"`) holds conversations as its
documents, each `gpt_moe.chat.render_conversation(tokenizer, messages)` ids followed by one <|endoftext|>,
never across two shards, and beside every token shard `X.bin` a loss-mask shard

    train_00000.mask.bin ...  uint8, one byte per token of X.bin: 1 = the model is trained to produce this
                              token (assistant text and its <|end|>), 0 = not (system and user turns, role
                              markers, the <|endoftext|> after each conversation)

recorded per shard as `mask_file` and `mask_sha256`, and a manifest `chat` section (`ChatInfo`: the template's
sha256, --max-seq-len, per split conversations / tokens / trained tokens, bad rows skipped by kind).
`TokenShards.masks(split)` reads the mask shards aligned one-to-one with `TokenShards.tokens(split)`.

The manifest is written last: a directory without one is incomplete.

Sampling. A split is cut, shard by shard, into windows of seq_len + 1 tokens starting at
multiples of seq_len (consecutive windows share one token: the last target of one is the
first input of the next; a window never crosses a shard). An epoch visits each of its M
windows once, in the order of a permutation seeded by (seed, epoch). One integer, the
global position g, counts the windows consumed by all ranks together: on rank r of W
with micro batch B, `next_batch()` reads items g + r*B .. g + r*B + B - 1 and every rank
advances g by W*B. Item i is window perm_(i // M)[i % M], so ranks never share a window
within an epoch, and a saved g resumes the exact sequence for any (W, B).

Shapes: `next_batch()` returns x, y: int64 [micro_batch, seq_len], y[:, t] = x[:, t + 1]
(as tokens of the window: x = window[:-1], y = window[1:]).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken

from gpt_moe.errors import DataError
from gpt_moe.tokenizer import TokenizerInfo, load_saved_tokenizer

FORMAT = "gpt-moe-token-shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"  # present while data_prep has not finished
SPLITS = ("train", "val")
CONTENTS = ("text", "chat")
MASK_DTYPE = np.dtype("u1")
"""Loss-mask shards of chat data: one byte per token, 1 = trained."""
if TYPE_CHECKING:
    import torch

PREPARE_HINT = "hint: run python -m data_prep with --out pointing at this directory"
DEFAULT_DATA_DIR = "data/builtin"
DEFAULT_CHAT_DATA_DIR = "data/chat-builtin"
"""Where `python -m data_prep --format chat --source builtin-chat` puts the built-in conversations: the default
data of a fine-tuning run (--init-from)."""
"""Where `python -m data_prep` puts the built-in corpus and where training looks for data by default."""


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
    """The manifest's `chat` section: the template identity (sha256 of `gpt_moe.chat.JINJA_TEMPLATE`), the
    --max-seq-len conversations were held to (in tokens, the end-of-text included), per-split totals, and the
    bad rows skipped: a count per kind (every kind present, 0 when none) and the first few `where: problem`."""

    template_sha256: str
    max_seq_len: int
    splits: dict[str, ChatSplit] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_first: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ChatInfo:
        """From its JSON form; KeyError, TypeError, ValueError or AttributeError when malformed."""
        return cls(template_sha256=str(data["template_sha256"]), max_seq_len=int(data["max_seq_len"]),
                   splits={str(k): ChatSplit(**{f: int(v[f]) for f in ("conversations", "tokens", "trained_tokens")})
                           for k, v in data["splits"].items()},
                   skipped={str(k): int(v) for k, v in data["skipped"].items()},
                   skipped_first={str(k): [str(w) for w in v] for k, v in data.get("skipped_first", {}).items()})


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


class TokenShards:
    """A prepared directory opened for reading: manifest checked, shards memory-mapped on use.

    Opening checks that every shard exists with the size its token count implies;
    `verify=True` (or `verify()`) also checks every sha256 (`gpt_moe.data_verify` checks them once
    and remembers, the check before training). Nothing is read into RAM.
    """

    def __init__(self, directory: str | Path, verify: bool = False):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._masks: dict[str, list[np.ndarray]] = {}
        for split in self.manifest.splits.values():
            for shard in split.shards:
                for file, expected, _ in shard.files(self.dtype.itemsize):
                    self._check_size(self.directory / file, shard.tokens, expected)
        if verify:
            self.verify()

    def _check_size(self, path: Path, tokens: int, expected: int) -> None:
        """DataError unless `path` holds `expected` bytes (a token shard, or a mask shard of one byte per token)."""
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            what = "uint8 loss mask" if path.name.endswith(".mask.bin") else self.manifest.dtype
            raise DataError(f"{path}: {found}, the manifest says {tokens} tokens = {expected} bytes "
                            f"of {what} (truncated or replaced shard); {repair_hint(self.manifest, self.directory)}")

    @property
    def content(self) -> str:
        """"text" (documents) or "chat" (conversations, with loss masks: see `masks`)."""
        return self.manifest.content

    @property
    def n_vocab(self) -> int:
        return self.manifest.tokenizer.n_vocab

    @property
    def eot_id(self) -> int:
        return self.manifest.tokenizer.eot_id

    def has_split(self, split: str) -> bool:
        """Whether the data has tokens in `split`: "val" is empty when prepared with --val-fraction 0."""
        info = self.manifest.splits.get(split)
        return info is not None and info.tokens > 0

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest: `gpt_moe.data_verify.verify_data(self, "always")`."""
        from gpt_moe.data_verify import verify_data  # that module builds on this one

        verify_data(self, "always")

    def _shards(self, split: str) -> list[ShardInfo]:
        """The split's non-empty shards in stream order; DataError for an unknown split."""
        if split not in self.manifest.splits:
            raise DataError(f"{self.directory / MANIFEST_FILE}: no split {split!r}; "
                            f"available: {', '.join(self.manifest.splits)}")
        return [s for s in self.manifest.splits[split].shards if s.tokens > 0]

    def tokens(self, split: str) -> list[np.ndarray]:
        """The split's shards as read-only memory maps, 1-D [tokens] each, in stream order."""
        if split not in self._arrays:
            self._arrays[split] = [np.memmap(self.directory / s.file, dtype=self.dtype, mode="r")
                                   for s in self._shards(split)]
        return self._arrays[split]

    def masks(self, split: str) -> list[np.ndarray]:
        """Chat data: the split's loss masks as read-only memory maps, uint8 [tokens] each, aligned one-to-one
        with `tokens(split)` (1 = the model is trained to produce that token). DataError for text data and for
        a mask shard whose size differs from its token shard's token count."""
        if self.content != "chat":
            raise DataError(f"{self.directory}: text data has no loss masks (content {self.content!r}); hint: "
                            "prepare conversations with python -m data_prep --format chat")
        if split not in self._masks:
            masks = []
            for shard in self._shards(split):
                self._check_size(self.directory / str(shard.mask_file), shard.tokens, shard.tokens)
                masks.append(np.memmap(self.directory / str(shard.mask_file), dtype=MASK_DTYPE, mode="r"))
            self._masks[split] = masks
        return self._masks[split]

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding cannot hold every token id of this data."""
        if model_vocab_size < self.n_vocab:
            raise DataError(f"{self.directory}: the data's tokenizer {self.manifest.tokenizer.name} has "
                            f"n_vocab {self.n_vocab} but the model's vocab_size is {model_vocab_size}; "
                            f"hint: set vocab_size >= {self.n_vocab} in the model config")

    def tokenizer(self) -> tiktoken.Encoding:
        """The tiktoken Encoding the shards were made with (rebuilt from tokenizer.tiktoken)."""
        return load_saved_tokenizer(self.manifest.tokenizer, self.directory)


class _Windows:
    """Windows of seq_len + 1 tokens at multiples of seq_len within each shard of a split."""

    def __init__(self, shards: TokenShards, split: str, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len}: expected a positive integer")
        self.arrays = shards.tokens(split)
        self.seq_len = seq_len
        counts = np.array([(len(a) - 1) // seq_len for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(counts)  # windows of shards 0..s
        self.count = int(self.ends[-1]) if len(self.ends) else 0
        if not shards.has_split(split):
            why = " (prepared with --val-fraction 0: no validation split)" if split == "val" else ""
            raise DataError(f"{shards.directory}: split {split!r} has no tokens{why}; hint: check "
                            "TokenShards.has_split() first, or prepare the data with --val-fraction > 0")
        if self.count == 0:
            total = sum(len(a) for a in self.arrays)
            raise DataError(f"{shards.directory}: split {split!r} has {total} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; hint: use a smaller seq_len or prepare more data")

    def gather(self, window_ids: np.ndarray) -> torch.Tensor:
        """Tokens of the given windows: int64 [len(window_ids), seq_len + 1]."""
        import torch  # here, not at the top: data_prep reads the format above without torch's import time

        shard = np.searchsorted(self.ends, window_ids, side="right")
        first = np.where(shard > 0, self.ends[shard - 1], 0)
        starts = (window_ids - first) * self.seq_len
        out = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard.tolist(), starts.tolist())):
            out[row] = self.arrays[s][start:start + self.seq_len + 1]
        return torch.from_numpy(out)


def _split_xy(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TrainBatches:
    """Shuffled training batches for one data-parallel rank (see the module docstring).

    `loader.next_batch()` -> x, y: int64 [micro_batch, seq_len]. Every rank must call it
    the same number of times (once per micro step). `state_dict()` stores the global
    position; loading it into a loader with another world size or micro batch continues
    the same global sequence of windows.
    """

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
        if micro_batch < 1:
            raise DataError(f"micro_batch {micro_batch}: expected a positive integer")
        self.windows = _Windows(shards, split, seq_len)
        self.seq_len, self.micro_batch, self.rank, self.world_size = seq_len, micro_batch, rank, world_size
        self.seed, self.split = seed, split
        self.position = 0  # windows consumed by all ranks together
        self._perms: dict[int, np.ndarray] = {}

    @property
    def windows_per_epoch(self) -> int:
        return self.windows.count

    @property
    def epoch(self) -> float:
        """Epochs completed so far (fractional)."""
        return self.position / self.windows.count

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep at most two
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.windows.count)
        return self._perms[epoch]

    def window_ids(self, position: int) -> np.ndarray:
        """Window ids this rank reads in the step that starts at global `position`: [micro_batch]."""
        items = position + self.rank * self.micro_batch + np.arange(self.micro_batch, dtype=np.int64)
        epochs, offsets = np.divmod(items, self.windows.count)
        ids = np.empty_like(items)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            ids[mask] = self._permutation(epoch)[offsets[mask]]
        return ids

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [micro_batch, seq_len] for this rank; advances the global position."""
        windows = self.windows.gather(self.window_ids(self.position))
        self.position += self.world_size * self.micro_batch
        return _split_xy(windows)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "windows_per_epoch": self.windows.count}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "split", "windows_per_epoch"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(f"data loader state: {key} is {state.get(key)!r} in the checkpoint but {mine!r} now; "
                                "hint: resume with the same data directory, seq_len and seed")
        self.position = int(state["position"])


class ValBatches:
    """Deterministic validation batches: windows in order, the first `n_batches` steps.

    Batch b on rank r reads windows (b*W + r)*B .. (b*W + r)*B + B - 1; each iteration
    starts again from the first batch. Yields x, y: int64 [micro_batch, seq_len].
    """

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, n_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, split: str = "val"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of world_size {world_size}: expected 0 <= rank < world_size")
        if micro_batch < 1:
            raise DataError(f"micro_batch {micro_batch}: expected a positive integer")
        self.windows = _Windows(shards, split, seq_len)
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        available = self.windows.count // (world_size * micro_batch)
        if available == 0:
            raise DataError(f"{shards.directory}: split {split!r} has {self.windows.count} windows of "
                            f"{seq_len + 1} tokens, fewer than one batch of {world_size} x {micro_batch}; "
                            "hint: use a smaller seq_len or micro batch, or a larger --val-fraction")
        self.n_batches = available if n_batches is None else min(n_batches, available)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(self.n_batches):
            first = (b * self.world_size + self.rank) * self.micro_batch
            yield _split_xy(self.windows.gather(np.arange(first, first + self.micro_batch, dtype=np.int64)))
