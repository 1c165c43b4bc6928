"""Atomic, durable file writes: the one rule every file the project writes follows.

A file is written under a temporary name beside its destination (`.NAME.PID.tmp`), flushed and
fsync'ed, renamed over the destination, and the directory is fsync'ed so that the rename survives a
crash. A reader therefore sees either the old file or the whole new one, never a part. A write that
fails removes its temporary file and leaves the destination as it was.

    write_atomic(path, b"...")                       # bytes or text
    with AtomicFile(path) as f: torch.save(obj, f)   # anything that writes to a binary file
    shard = AtomicFile(path); shard.write(...); shard.commit()   # streamed, committed (or aborted) later

A directory (an export, a layout-free checkpoint) is built under `partial_dir(out)` and published whole by
`publish_dir`: every file in it is fsync'ed, then it is renamed to `out`. A reader sees no `out` or all of it;
an interrupted build leaves only the partial directory, which the next build replaces.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.tmp$")
"""Matches the temporary names this module makes; group `name` is the destination's file name."""


def temp_path(path: Path) -> Path:
    """Where the new content of `path` is written before the rename (unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_file(path: Path) -> None:
    """Make what was written to `path` (by any process of this host) durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make renames and removals inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A binary file that appears at `path` only when `commit()` succeeds (the context manager commits
    on success and aborts on an exception)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.temp = temp_path(self.path)
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # mode honours the umask
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        """Flush, fsync, rename over `path`, fsync the directory; on any failure, abort and re-raise."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and remove the temporary file; the destination is untouched."""
        self.file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def unwritable_reason(directory: str | Path) -> str | None:
    """Why files cannot be written in `directory` (made if missing), or None when they can: checked by
    creating and removing a temporary file, so permissions, read-only mounts and full quotas all show."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = AtomicFile(directory / ".write-probe")
        probe.abort()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def missing_dirs(directory: str | Path) -> list[Path]:
    """`directory` and those of its ancestors that do not exist yet, deepest first: what `mkdir(parents=True)`
    (or `unwritable_reason`) will make, and `remove_empty_dirs` can take back."""
    missing, path = [], Path(directory).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(directories: list[Path]) -> None:
    """Removes each of `directories` (deepest first) that is still empty; leaves anything with content alone."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (or already gone): its parents are not empty either


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (text is written as UTF-8) atomically and durably."""
    with AtomicFile(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def partial_dir(out: str | Path) -> Path:
    """Where a directory published as `out` is built: `OUT.partial` beside it, emptied of an earlier interrupted
    build and made anew."""
    partial = Path(out).with_name(Path(out).name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def publish_dir(partial: Path, out: str | Path) -> Path:
    """Makes the finished directory `partial` appear as `out` (which must not exist, or be an empty directory):
    every file in it flushed to disk, the rename made durable."""
    out = Path(out)
    for path in sorted(partial.rglob("*"), key=lambda p: -len(p.parts)):  # files first, then their directories
        if path.is_file():
            fsync_file(path)
        else:
            fsync_dir(path)
    fsync_dir(partial)
    if out.is_dir():
        out.rmdir()  # empty: a non-empty one is refused before anything is built
    os.replace(partial, out)
    fsync_dir(out.parent)
    return out
