"""An exclusive lock on a data_prep output directory: one run at a time.

    with OutputLock(out):   # DataError at once when another run holds it, naming that run
        ...

The lock is `fcntl.flock` on `.data_prep.lock` inside the directory (created, with the directory, when
missing); the holder writes its pid, host, start time and command into it for the run it refuses. The
kernel releases a flock when the last descriptor of its open file closes, so the lock ends with the
process, also on Ctrl-C or SIGKILL: the processes it forks hold copies but end with it (tokenizer
workers when their task queue closes, BPE training by the kernel's parent-death signal). The file
stays after the run (removing it would race with a run that has just opened it); it is the one file
data_prep writes in place rather than atomically, since a lock must stay the same file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from gpt_moe.errors import DataError

LOCK_FILE = ".data_prep.lock"


class OutputLock:
    """Holds the lock of the output directory `out` (created when missing) between enter and exit.

    With `read_only_ok`, a directory this process may not write into (permissions, a read-only
    filesystem) is not an error: nothing can be written there, so the lock is not needed to read it
    (`writable` is False; `require_writable()` raises before a write).
    """

    def __init__(self, out: Path, read_only_ok: bool = False):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.read_only_ok = read_only_ok
        self.fd: int | None = None
        self.writable = True
        self.reason = ""

    def require_writable(self) -> None:
        if not self.writable:
            raise DataError(f"--out {self.out}: cannot write there ({self.reason}); hint: choose a writable directory")

    def __enter__(self) -> OutputLock:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            self.writable, self.reason = False, e.strerror or type(e).__name__
            read_only = e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        if not self.writable:
            if not (self.read_only_ok and read_only):
                self.require_writable()
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _one_line(os.pread(fd, 4096, 0).decode(errors="replace")) or "it has not said who it is yet"
            os.close(fd)
            raise DataError(f"--out {self.out} is in use by another data_prep run ({holder}); hint: wait for it "
                            "to finish (or stop it), or choose another --out") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_whoami()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def _whoami() -> str:
    """This run, for the one it refuses: pid, host, start time and command (an inline `-c` script as ...)."""
    argv = list(sys.orig_argv)
    if "-c" in argv[:-1]:
        argv[argv.index("-c") + 1] = "..."
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return _one_line(f"pid {os.getpid()} on {socket.gethostname()} since {started}: {shlex.join(argv)}")


def _one_line(text: str, limit: int = 400) -> str:
    """Whitespace runs (newlines of a `python -c` script included) as one space, at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
