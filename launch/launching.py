"""Starting real training jobs from the tests and `bench.py scale`: `python launch/train.py` or the `deepspeed` launcher
with N CPU ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train(*args: str, ranks: int = 2, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS launch/train.py ARGS`, or `python launch/train.py ARGS` for ranks=0; one thread
    per rank when there are several (they share this machine's cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if ranks else "2", TOKENIZERS_PARALLELISM="false")
    port = free_port()
    if ranks:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, "launch/train.py", *args]
    else:
        cmd = [sys.executable, "launch/train.py", *args]
        env["MASTER_PORT"] = port
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    # DeepSpeed's CPU allreduce workspaces (69 MB of RAM each) must not outlive the run: see
    # gpt_moe.train.hardware.unlink_cpu_allreduce_buffer
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {[p.name for p in left]}"
    return result
