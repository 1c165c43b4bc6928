"""One data_prep run per output directory: the lock of `--out` (a `gpt_moe.dir_lock.DirectoryLock`).

    with output_lock(out):   # DataError at once when another run holds it, naming that run
        ...

The processes a run forks hold copies of the lock's descriptor but end with it (tokenizer workers when their task
queue closes, BPE training by the kernel's parent-death signal), so the lock ends with the run however it ends.
"""

from __future__ import annotations

from pathlib import Path

from gpt_moe.dir_lock import DirectoryLock
from gpt_moe.errors import DataError

LOCK_FILE = ".data_prep.lock"


def output_lock(out: Path, read_only_ok: bool = False) -> DirectoryLock:
    """The lock of `--out` (taken on enter). With `read_only_ok`, a directory this process may not write into is
    not an error (see `DirectoryLock`)."""
    return DirectoryLock(out, LOCK_FILE, "--out", "data_prep run", DataError, read_only_ok)
