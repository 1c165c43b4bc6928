"""An exclusive lock on a directory: one data_prep run per output directory, one training run per run directory.

    lock = DirectoryLock(directory, ".run.lock", "--run-dir", "training run", ConfigError).acquire()
    ...                                     # the error type at once when another run holds it, naming that run
    lock.release()                          # also at interpreter exit; the kernel releases it when the process dies

The lock is `fcntl.flock` on a file inside the directory (created, with the directory, when missing); the holder
writes its record into it (pid, host, start time, command) for the run it refuses, and clears it when it releases
the lock. The kernel releases a flock when the last descriptor of its open file closes, so the lock ends with the
process, also on Ctrl-C or SIGKILL. A record left behind therefore means its holder ended without releasing: one on
this host whose process is gone is taken over with a notice; one from another host is refused, naming it (a
filesystem shared between hosts may not carry flocks between them, so its holder may still be running there). The
file stays after the run (removing it would race with a run that has just opened it); it is written in place
rather than atomically, since a lock must stay the same file.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from gpt_moe.errors import GptMoeError

log = logging.getLogger(__name__)


class DirectoryLock:
    """The lock of `directory` (created when missing), held between `acquire` and `release`. `flag` and `what` name
    the directory and its user in messages ("--out", "data_prep run"); `error` is the exception type a refusal
    raises. With `read_only_ok`, a directory this process may not write into is not an error: nothing can be written
    there, so the lock is not needed to read it (`writable` is False; `require_writable()` raises before a write)."""

    def __init__(self, directory: str | Path, file_name: str, flag: str, what: str,
                 error: type[GptMoeError], read_only_ok: bool = False) -> None:
        self.directory, self.path = Path(directory), Path(directory) / file_name
        self.flag, self.what, self.error, self.read_only_ok = flag, what, error, read_only_ok
        self.fd: int | None = None
        self.writable, self.reason = True, ""

    def require_writable(self) -> None:
        if not self.writable:
            raise self.error(f"{self.flag} {self.directory}: cannot write there ({self.reason}); hint: choose a "
                             "writable directory")

    def acquire(self) -> DirectoryLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            self.writable, self.reason = False, e.strerror or type(e).__name__
            if not (self.read_only_ok and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                self.require_writable()
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe(read_record(fd)) or "it has not said who it is yet"
            os.close(fd)
            raise self.error(f"{self.flag} {self.directory} is in use by another {self.what} ({holder}); hint: wait "
                             f"for it to finish (or stop it), or choose another {self.flag}") from None
        self._take_over(fd, read_record(fd))
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(own_record()) + "\n").encode(), 0)
        atexit.register(self.release)
        return self

    def _take_over(self, fd: int, left: dict | None) -> None:
        """A record left by a holder that did not release: refused when it may still run on another host."""
        if left is None:
            return
        if left.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise self.error(f"{self.flag} {self.directory} is held by a {self.what} on another host "
                             f"({describe(left)}); hint: if that run has ended, delete {self.path}")
        log.warning("%s %s: taking over the lock of a %s that ended without releasing it (%s)", self.flag,
                    self.directory, self.what, describe(left) or "unknown holder")

    def release(self) -> None:
        """Clears the record and releases the lock (idempotent)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def own_record() -> dict:
    """This run, for the one it refuses: pid, host, start time and command (an inline `-c` script as ...)."""
    argv = list(sys.orig_argv)
    if "-c" in argv[:-1]:
        argv[argv.index("-c") + 1] = "..."
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()), "command": shlex.join(argv)}


def read_record(fd: int) -> dict | None:
    """The record in the lock file, or None when it is empty (released cleanly, or new); text that is not our record
    (written by an older version) as {"text": ...}."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    return record if isinstance(record, dict) else {"text": text}


def describe(record: dict | None, limit: int = 2000) -> str:
    """A holder in one line: pid, host, start time, command (whitespace runs folded, at most `limit` characters)."""
    if not record:
        return ""
    if "text" in record:
        text = record["text"]
    else:
        text = (f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}: "
                f"{record.get('command', '')}")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
