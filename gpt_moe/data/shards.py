"""Reading prepared token shards: `TokenShards` (the directory opened, every shard memory-mapped on use) and the batch
samplers of pretraining (`TrainBatches`, `ValBatches`). The format is `gpt_moe.data.manifest`.

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

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt_moe.data.manifest import MANIFEST_FILE, MASK_DTYPE, Manifest, ShardInfo, repair_hint
from gpt_moe.data.tokenizer import load_saved_tokenizer
from gpt_moe.data.tokenizer_format import Tokenizer
from gpt_moe.errors import DataError

if TYPE_CHECKING:
    import torch


class TokenShards:
    """A prepared directory opened for reading: manifest checked, shards memory-mapped on use.

    Opening checks that every shard exists with the size its token count implies; the sha256 of every shard
    is checked by `gpt_moe.data.verify.verify_data` (once, and remembered: the check before training).
    Nothing is read into RAM.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._masks: dict[str, list[np.ndarray]] = {}
        for split in self.manifest.splits.values():
            for shard in split.shards:
                for file, expected, _ in shard.files(self.dtype.itemsize):
                    self._check_size(self.directory / file, shard.tokens, expected)

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

    def check_ids(self, ids: np.ndarray, split: str, shard: int) -> None:
        """DataError unless every id read from shard `shard` of `split` is below the tokenizer's n_vocab: a shard
        changed after its verification with its size and modification time kept (which `--verify-data first`
        trusts) would otherwise index past the embedding in the middle of training. One reduction per read."""
        largest = int(ids.max()) if ids.size else -1
        if largest >= self.n_vocab:
            path = self.directory / self._shards(split)[shard].file
            raise DataError(f"{path}: token id {largest} is beyond the tokenizer's {self.n_vocab} tokens: the shard "
                            "changed after it was verified (its size and modification time kept, which --verify-data "
                            "first trusts); run with --verify-data always to check every shard; "
                            f"{repair_hint(self.manifest, self.directory)}")

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding cannot hold every token id of this data."""
        if model_vocab_size < self.n_vocab:
            raise DataError(f"{self.directory}: the data's tokenizer {self.manifest.tokenizer.name} has "
                            f"n_vocab {self.n_vocab} but the model's vocab_size is {model_vocab_size}; "
                            f"hint: set vocab_size >= {self.n_vocab} in the model config")

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with, rebuilt from its files here (ours: tokenizer.tiktoken; a published
        model's: its own files)."""
        return load_saved_tokenizer(self.manifest.tokenizer, self.directory)


class _Windows:
    """Windows of seq_len + 1 tokens at multiples of seq_len within each shard of a split."""

    def __init__(self, shards: TokenShards, split: str, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len}: expected a positive integer")
        self.shards, self.split = shards, split
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
            self.shards.check_ids(out[row], self.split, s)
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
