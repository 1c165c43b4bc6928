"""Data verification on first use: every shard's sha256 checked against the manifest, remembered by size and
modification time so that later starts hash only what changed, and the largest token id of the data. The
loss-mask shards of chat data are checked the same way (a mask file counts as a shard here).

    check = verify_data(TokenShards("data/builtin"), mode="first")   # DataError naming a damaged shard
    check.max_token_id   # the largest token id in the data: a model needs vocab_size > it
    check.hashed         # the shard files hashed this time
    check.record         # data/builtin/verified.json, or None when the directory is not writable

Modes (`VERIFY_MODES`): "first" (the default) hashes the shards the record does not vouch for: new ones,
and those whose size or st_mtime_ns changed since they were hashed; "always" hashes every shard; "never"
hashes none (opening `TokenShards` still checks every shard's size).

The record, `verified.json` in the data directory (written atomically, and only when something changed),
holds per shard file: size, st_mtime_ns, sha256, largest token id and when it was hashed. An entry vouches
for a shard when size, mtime and sha256 (the manifest's) all match and the shard had last been modified at
least `RACY_NS` before it was hashed: a file written again within the filesystem's timestamp granularity
after hashing can keep its mtime (git calls such entries racy), so those shards are hashed once more on
the next start. When the directory is not writable nothing is recorded, every start hashes again, and
`DataCheck.record` is None with `record_error` saying why. An unreadable or foreign record is ignored.

The largest token id per shard comes from the manifest (data_prep records it), else from the record, else
from the hashing pass; in "never" mode a shard of an older manifest without it is read once for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpt_moe.atomic import write_atomic
from gpt_moe.data.manifest import MANIFEST_FILE, MASK_DTYPE, Manifest, repair_hint
from gpt_moe.data.shards import TokenShards
from gpt_moe.errors import DataError

log = logging.getLogger(__name__)

VERIFY_MODES = ("first", "always", "never")
RECORD_FILE = "verified.json"
RECORD_FORMAT = "gpt-moe-shard-verification"
RECORD_VERSION = 1
RACY_NS = 2 * 10**9
"""A shard modified less than this before it was hashed is hashed again on the next start (2 s: FAT's mtime
granularity; ext4 and most others keep nanoseconds, updated once per kernel tick)."""


@dataclass(frozen=True)
class ShardProblem:
    """A shard that does not match the manifest: `problem` is "missing", its size, or its sha256."""

    file: str
    problem: str


@dataclass(frozen=True)
class DataCheck:
    """What a verification found. `max_token_id` is over the shards without problems (-1: no tokens);
    `hashed` lists the shard files hashed this time, in manifest order; `record` is the record file, or
    None when it could not be written (`record_error`: why; every start then hashes again)."""

    directory: Path
    mode: str
    max_token_id: int
    max_token_ids: dict[str, int]
    hashed: list[str]
    problems: list[ShardProblem] = field(default_factory=list)
    record: Path | None = None
    record_error: str = ""


@dataclass(frozen=True)
class _Entry:
    """What the record knows about one shard file."""

    size: int
    mtime_ns: int
    sha256: str
    max_token_id: int
    hashed_at_ns: int

    def matches(self, size: int, mtime_ns: int, sha256: str) -> bool:
        return (self.size, self.mtime_ns, self.sha256) == (size, mtime_ns, sha256)

    @property
    def settled(self) -> bool:
        """Hashed long enough after its last modification that a later one changes the mtime."""
        return self.mtime_ns + RACY_NS <= self.hashed_at_ns


def hash_and_max(path: Path, dtype: np.dtype, chunk_bytes: int = 1 << 22) -> tuple[str, int]:
    """Hex sha256 of a shard file and its largest token id (-1 when empty), in one read."""
    digest, largest = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):  # chunk_bytes is a multiple of every token size
            digest.update(block)
            largest = max(largest, int(np.frombuffer(block, dtype=dtype).max()))
    return digest.hexdigest(), largest


def _load_record(path: Path) -> dict[str, _Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable verification record, ignored (%s)", path, e)
        return {}
    try:
        if data["format"] != RECORD_FORMAT or data["version"] != RECORD_VERSION:
            raise ValueError(f"format {data['format']!r} version {data['version']!r}")
        return {str(name): _Entry(int(e["size"]), int(e["mtime_ns"]), str(e["sha256"]), int(e["max_token_id"]),
                                  int(e["hashed_at_ns"])) for name, e in data["shards"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("%s: not a verification record this version reads, ignored (%s: %s)", path, type(e).__name__, e)
        return {}


def _save_record(path: Path, entries: dict[str, _Entry]) -> str:
    """Write the record; "" on success, else why not (the directory is not writable, the disk is full)."""
    data = {"format": RECORD_FORMAT, "version": RECORD_VERSION,
            "shards": {name: asdict(entry) for name, entry in entries.items()}}
    try:
        write_atomic(path, json.dumps(data, indent=1) + "\n")
    except OSError as e:
        return f"{path}: {e.strerror or type(e).__name__}"
    return ""


@dataclass(frozen=True)
class _File:
    """One file of the data to check: a token shard, or (chat data) a shard's loss mask."""

    name: str
    tokens: int
    size: int  # expected bytes
    sha256: str
    dtype: np.dtype
    max_token_id: int | None  # the manifest's, for a token shard; None for a mask
    is_mask: bool = False


def _files(manifest: Manifest, dtype: np.dtype) -> list[_File]:
    """Every token shard of the manifest, each followed by its mask shard (chat data), in manifest order."""
    files = []
    for split in manifest.splits.values():
        for shard in split.shards:
            for index, (name, size, sha256) in enumerate(shard.files(dtype.itemsize)):
                mask = index > 0
                files.append(_File(name, shard.tokens, size, sha256, MASK_DTYPE if mask else dtype,
                                   None if mask else shard.max_token_id, mask))
    return files


def _check_shard(directory: Path, shard: _File, entry: _Entry | None,
                 mode: str) -> ShardProblem | tuple[_Entry | None, bool, int]:
    """A shard's problem, or (its record entry, whether it was hashed now, its largest value: token id or mask)."""
    path = directory / shard.name
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ShardProblem(shard.name, "missing")
    if stat.st_size != shard.size:
        what = "uint8 loss mask" if shard.is_mask else shard.dtype.name
        return ShardProblem(shard.name, f"{stat.st_size} bytes, the manifest says {shard.tokens} tokens = "
                                        f"{shard.size} bytes of {what} (truncated or replaced shard)")
    known = entry if entry is not None and entry.matches(stat.st_size, stat.st_mtime_ns, shard.sha256) else None
    if mode == "always" or (mode == "first" and not (known and known.settled)):
        hashed_at = time.time_ns()
        digest, largest = hash_and_max(path, shard.dtype)
        if digest != shard.sha256:
            return ShardProblem(shard.name, f"sha256 {digest[:12]}... differs from the manifest's "
                                            f"{shard.sha256[:12]}... (altered shard)")
        return _Entry(stat.st_size, stat.st_mtime_ns, digest, largest, hashed_at), True, largest
    if shard.max_token_id is not None or shard.is_mask:  # a mask's largest value is not needed
        return known, False, -1 if shard.max_token_id is None else shard.max_token_id
    if known is not None:
        return known, False, known.max_token_id
    largest = int(np.memmap(path, dtype=shard.dtype, mode="r").max()) if shard.tokens else -1
    return None, False, largest


def check_data(directory: str | Path, manifest: Manifest, mode: str = "first") -> DataCheck:
    """Check the shards of `manifest` in `directory` (see the module docstring) and update the record.

    Collects every problem instead of raising (data_prep rebuilds the shards it lists); raises
    DataError only for an unknown mode. `verify_data` is the check before training.
    """
    if mode not in VERIFY_MODES:
        raise DataError(f"verify mode {mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    directory = Path(directory)
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    record_path = directory / RECORD_FILE
    before = _load_record(record_path)
    entries: dict[str, _Entry] = {}
    largest: dict[str, int] = {}
    hashed: list[str] = []
    problems: list[ShardProblem] = []
    for shard in _files(manifest, dtype):
        result = _check_shard(directory, shard, before.get(shard.name), mode)
        if isinstance(result, ShardProblem):
            problems.append(result)
            continue
        entry, was_hashed, value = result
        if not shard.is_mask:
            largest[shard.name] = value
        if entry is not None:
            entries[shard.name] = entry
        if was_hashed:
            hashed.append(shard.name)
    error = _save_record(record_path, entries) if entries != before else ""
    record = None if error or not record_path.is_file() else record_path
    return DataCheck(directory, mode, max(largest.values(), default=-1), largest, hashed, problems, record, error)


def verify_data(shards: TokenShards, mode: str = "first") -> DataCheck:
    """Verify an opened dataset before training (see the module docstring for the modes and the record).

    Raises DataError naming the first damaged shard (with the data_prep command that rebuilds it), or
    when the data holds a token id the manifest's tokenizer does not have (n_vocab edited or mixed up);
    otherwise returns the DataCheck: `max_token_id` for the model's vocabulary, `hashed`, `record`.
    """
    check = check_data(shards.directory, shards.manifest, mode)
    if check.problems:
        first, more = check.problems[0], len(check.problems) - 1
        others = f" ({more} more damaged or missing shard{'s' if more > 1 else ''})" if more else ""
        raise DataError(f"{shards.directory / first.file}: {first.problem}{others}; "
                        f"{repair_hint(shards.manifest, shards.directory)}")
    if check.max_token_id >= shards.n_vocab:
        where = max(check.max_token_ids, key=check.max_token_ids.__getitem__)
        raise DataError(f"{shards.directory / MANIFEST_FILE}: the data holds token id {check.max_token_id} (in "
                        f"{where}) but the manifest's tokenizer {shards.manifest.tokenizer.name} has n_vocab "
                        f"{shards.n_vocab} (an edited manifest, or shards of another dataset); "
                        f"hint: prepare the data again into a new directory with python -m data_prep")
    return check
