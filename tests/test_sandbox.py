"""The sandbox that runs model-written code (`gpt_moe.serve.sandbox`): hostile programs (deleting files, fork bombs,
endless loops, the network, memory) are contained, killed where they do not stop, and counted as failed; ordinary
programs pass. Every hostile program reaches for the dangerous call below the disabled Python functions too
(`posix`, `ctypes`), where only the seccomp filter and the limits hold."""

from __future__ import annotations

import socket
import subprocess

import pytest

from gpt_moe.serve.sandbox import CHILD, SandboxLimits, run_sandboxed

FAST = SandboxLimits(timeout=3, cpu_seconds=3)


def sandbox_processes() -> list[str]:
    """Command lines of every process on this machine still running the sandbox's child."""
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if str(CHILD) in line and not line.startswith("ps ")]


def test_a_correct_program_passes_and_a_failed_assertion_fails():
    assert run_sandboxed("import math\nassert math.gcd(12, 18) == 6\nprint('ok')\n").passed
    failed = run_sandboxed("assert 1 + 1 == 3, 'arithmetic'\n")
    assert failed.status == "failed" and "AssertionError: arithmetic" in failed.detail


@pytest.mark.parametrize("deletion", [
    "import os\nos.remove({file!r})",
    "import shutil\nshutil.rmtree({folder!r})",
    "import posix\nposix.unlink({file!r})",
    "import posix\nposix.rename({file!r}, {file!r} + '.moved')",
    "import ctypes\nassert ctypes.CDLL(None).unlink({file!r}.encode()) == 0",
    "open({file!r}, 'w').write('')",
    "import posix\nposix.open({file!r}, posix.O_WRONLY | posix.O_TRUNC)",
], ids=["os.remove", "shutil.rmtree", "posix.unlink", "posix.rename", "ctypes.unlink", "open-w", "posix.open-trunc"])
def test_a_program_that_deletes_or_clobbers_files_is_refused_and_fails(tmp_path, deletion):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "data.txt").write_text("keep me")
    result = run_sandboxed(deletion.format(file=str(folder / "data.txt"), folder=str(folder)), FAST)
    assert result.status == "failed", result
    assert sorted(p.name for p in folder.iterdir()) == ["data.txt"] and (folder / "data.txt").read_text() == "keep me"


@pytest.mark.parametrize("bomb", [
    "import posix\nwhile True:\n    posix.fork()",  # fails at its first fork
    "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()",  # ignores the failures: killed at timeout
    "import subprocess\nwhile True:\n    subprocess.Popen(['python3', '-c', 'pass'])",
    "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 60'])",
], ids=["posix.fork", "ctypes.fork", "subprocess", "threads", "exec"])
def test_a_fork_bomb_creates_no_process_and_fails(bomb):
    before = sandbox_processes()
    result = run_sandboxed(bomb, FAST)
    assert result.status in ("failed", "timed out"), result
    assert sandbox_processes() == before == []  # nothing it started outlives it


def test_an_endless_loop_is_killed_at_the_wall_clock_timeout():
    result = run_sandboxed("import time\nwhile True:\n    time.sleep(0.01)\n", SandboxLimits(timeout=1.5))
    assert result.status == "timed out" and not result.passed
    assert result.seconds < 1.5 + 10  # the timeout, not the program, ended it
    assert sandbox_processes() == []


def test_no_network_and_no_memory_beyond_the_limit():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
        assert result.status == "failed" and "PermissionError" in result.detail, result
        with pytest.raises(TimeoutError):
            server.accept()
    memory = run_sandboxed("block = bytearray(4 << 30)\n", SandboxLimits(memory_bytes=1 << 30))
    assert memory.status == "failed" and "MemoryError" in memory.detail
