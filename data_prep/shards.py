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
from gpt_moe.data import ShardInfo
from gpt_moe.errors import DataError

SHARD_NAME = "{split}_{part:05d}.bin"
SHARD_FILE = re.compile(r"^(train|val)_(\d{5})\.bin$")


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


class ShardWriter:
    """One shard being written: tokens appended to a temporary file (`gpt_moe.atomic`), hashed on the way.

    With `keep=False` the tokens are only hashed, nothing is written (a rebuild checks that
    re-encoding reproduces a shard that is intact on disk).
    """

    def __init__(self, path: Path, dtype: np.dtype, keep: bool = True):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.file = AtomicFile(self.path) if keep else None
        self.digest = hashlib.sha256()
        self.tokens = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        raw = data.tobytes()
        if self.file is not None:
            self.file.write(raw)
        self.digest.update(raw)
        self.tokens += len(data)
        if len(data):
            self.max_token_id = max(self.max_token_id, int(data.max()))

    def info(self) -> ShardInfo:
        """The shard's record (of what was written so far)."""
        return ShardInfo(self.path.name, self.tokens, self.digest.hexdigest(), self.max_token_id)

    def close(self) -> ShardInfo:
        """Commit the file under its final name (when kept); the shard's record."""
        if self.file is not None:
            self.file.commit()
        return self.info()

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
