"""Writing token shards: the train/val assignment of documents and atomic shard files.

The output is cut into parts: a part closes after the piece that brings its tokens (both
splits) to `shard_tokens`, and writes `train_PPPPP.bin` and, when it holds validation
documents, `val_PPPPP.bin`. A shard is written under a temporary name and renamed only
once complete and fsync'ed, so a shard file that exists is whole; the manifest (written
last) says which shards make the dataset.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from gpt_moe.atomic import AtomicFile
from gpt_moe.data.manifest import MASK_DTYPE, ShardInfo
from gpt_moe.errors import DataError

SHARD_NAME = "{split}_{part:05d}.bin"
SHARD_FILE = re.compile(r"^(train|val)_(\d{5})(\.mask)?\.bin$")
"""A token shard's name, or its mask shard's (chat data)."""


def mask_name(shard: str) -> str:
    """The loss-mask file beside token shard `shard`: train_00003.bin -> train_00003.mask.bin."""
    return shard.removesuffix(".bin") + ".mask.bin"


def part_number(name: str) -> int:
    """The part a shard file belongs to, from its name (`SHARD_NAME`)."""
    match = SHARD_FILE.match(name)
    if match is None:
        raise DataError(f"{name}: not a shard name data_prep writes (expected e.g. train_00001.bin)")
    return int(match[2])


def is_val(doc: int, val_fraction: float) -> bool:
    """Whether document `doc` belongs to the validation split.

    Every 1/f-th document (f = val_fraction), evenly spread: document i is held out when
    floor((i + 1) * f) > floor(i * f), so the first n documents hold floor(n * f) of them;
    and when f > 0, document 1 too, so that any two documents make a validation split
    (document 0 always trains: f < 1).
    """
    if val_fraction > 0 and doc == 1:
        return True
    return math.floor((doc + 1) * val_fraction) > math.floor(doc * val_fraction)


class _HashedFile:
    """Bytes appended to a temporary file (`gpt_moe.atomic`) and hashed on the way; with `keep=False` only
    hashed, nothing is written (a rebuild checks that re-encoding reproduces a file that is intact on disk)."""

    def __init__(self, path: Path, keep: bool):
        self.file = AtomicFile(path) if keep else None
        self.digest = hashlib.sha256()

    def write(self, raw: bytes) -> None:
        if self.file is not None:
            self.file.write(raw)
        self.digest.update(raw)

    def commit(self) -> None:
        if self.file is not None:
            self.file.commit()

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()


class ShardWriter:
    """One shard being written: tokens appended to a temporary file, hashed on the way, and for chat data
    (`mask=True`) their loss mask to the mask shard beside it (`mask_name`).

    `keep` / `keep_mask` False: that file is only hashed, nothing is written (a rebuild checks that
    re-encoding reproduces a shard that is intact on disk).
    """

    def __init__(self, path: Path, dtype: np.dtype, keep: bool = True, mask: bool = False,
                 keep_mask: bool = True):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tokens_file = _HashedFile(self.path, keep)
        self.mask_file = _HashedFile(self.path.with_name(mask_name(self.path.name)), keep_mask) if mask else None
        self.tokens = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append tokens [n] (and, for chat data, their mask [n] of 0/1)."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        if (mask is None) != (self.mask_file is None) or (mask is not None and len(mask) != len(data)):
            raise ValueError(f"{self.path}: a mask of {None if mask is None else len(mask)} values for {len(data)} "
                             f"tokens (this shard {'has' if self.mask_file else 'has no'} mask)")
        self.tokens_file.write(data.tobytes())
        if self.mask_file is not None:
            self.mask_file.write(np.ascontiguousarray(mask, dtype=MASK_DTYPE).tobytes())
        self.tokens += len(data)
        if len(data):
            self.max_token_id = max(self.max_token_id, int(data.max()))

    def info(self) -> ShardInfo:
        """The shard's record (of what was written so far)."""
        mask = self.mask_file
        return ShardInfo(self.path.name, self.tokens, self.tokens_file.digest.hexdigest(), self.max_token_id,
                         None if mask is None else mask_name(self.path.name),
                         None if mask is None else mask.digest.hexdigest())

    def close(self) -> ShardInfo:
        """Commit the files under their final names (when kept); the shard's record."""
        try:
            self.tokens_file.commit()
            if self.mask_file is not None:
                self.mask_file.commit()
        except BaseException:
            self.abort()
            raise
        return self.info()

    def abort(self) -> None:
        self.tokens_file.abort()
        if self.mask_file is not None:
            self.mask_file.abort()
