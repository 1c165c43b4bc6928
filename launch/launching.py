"""Starting real training jobs from the tests and `bench.py scale`: `python launch/train.py` or the `deepspeed` launcher
with N CPU ranks on this machine, or several launchers each standing for one node on a loopback address."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_NODES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")  # the only "nodes" tests may use
NODE_LAUNCHERS = ("torchrun", "deepspeed")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def rank_env(threads: str = "1") -> dict[str, str]:
    """This process's environment for the ranks: `threads` OpenMP threads each (they share this machine's cores)."""
    return dict(os.environ, OMP_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")


def train(*args: str, ranks: int = 2, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS launch/train.py ARGS`, or `python launch/train.py ARGS` for ranks=0; one thread
    per rank when there are several (they share this machine's cores)."""
    env = rank_env("1" if ranks else "2")
    port = free_port()
    if ranks:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", port, "launch/train.py", *args]
    else:
        cmd = [sys.executable, "launch/train.py", *args]
        env["MASTER_PORT"] = port
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    assert_no_allreduce_workspace_left(port)
    return result


def assert_no_allreduce_workspace_left(port: str) -> None:
    """DeepSpeed's CPU allreduce workspaces (69 MB of RAM each) must not outlive the run: see
    gpt_moe.train.hardware.unlink_cpu_allreduce_buffer"""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {[p.name for p in left]}"


def node_launcher(form: str, node_rank: int, nodes: int, ranks_per_node: int, port: str,
                  hostfile: Path) -> list[str]:
    """The command one node runs before `launch/train.py`, `ranks_per_node` ranks, the master on node 0 (127.0.0.1):
    torchrun's static rendezvous, or DeepSpeed's launcher without ssh given this node's line of `hostfile`."""
    master = ["--master_addr", LOOPBACK_NODES[0], "--master_port", port]
    if form == "torchrun":
        return ["torchrun", "--nnodes", str(nodes), "--node_rank", str(node_rank), "--nproc_per_node",
                str(ranks_per_node), *master]
    if form == "deepspeed":
        return ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), *master]
    raise ValueError(f"unknown node launcher {form!r}; expected one of {NODE_LAUNCHERS}")


class NodeJob:
    """`launch/train.py ARGS` started on loopback "nodes", one launcher per node (`node_launcher`), all at once as a
    cluster job starts them. Each launcher is its own process group (with its ranks), so a test can kill or freeze
    one node; its output goes to a file (a full pipe would stall one node while the others wait for it in a
    collective). `node_dirs[i]` is node i's working directory (its own disk); by default every node runs in the
    repository (one shared file system)."""

    def __init__(self, form: str, *args: str, nodes: int = 2, ranks_per_node: int = 1,
                 node_dirs: list[Path] | None = None) -> None:
        if not 1 <= nodes <= len(LOOPBACK_NODES):
            raise ValueError(f"nodes={nodes}: between 1 and {len(LOOPBACK_NODES)} loopback nodes")
        self.port, env = free_port(), rank_env()
        self._scratch = tempfile.TemporaryDirectory(prefix="nodes-")
        scratch = Path(self._scratch.name)
        hostfile = scratch / "hostfile"
        hostfile.write_text("".join(f"{host} slots={ranks_per_node}\n" for host in LOOPBACK_NODES[:nodes]))
        self.commands: list[list[str]] = []
        self.processes: list[subprocess.Popen] = []
        self._logs = []
        for node in range(nodes):
            out, err = (open(scratch / f"node{node}.{name}", "w+") for name in ("out", "err"))
            cmd = [*node_launcher(form, node, nodes, ranks_per_node, self.port, hostfile),
                   str(REPO / "launch" / "train.py"), *args]
            cwd = node_dirs[node] if node_dirs else REPO
            self.commands.append(cmd)
            self._logs.append((out, err))
            self.processes.append(subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env,
                                                   start_new_session=True))

    def output(self, node: int) -> str:
        """What node `node`'s launcher and ranks printed so far (stdout)."""
        out, _ = self._logs[node]
        out.flush()
        return Path(out.name).read_text()

    def signal(self, node: int, signum: int) -> None:
        """`signum` to node `node`'s launcher and every process under it (SIGKILL: the node dies; SIGSTOP: it
        freezes with its sockets open, as a hung GPU or a network partition leaves it). By process tree, not group:
        torchrun starts its ranks in sessions of their own."""
        for pid in [self.processes[node].pid, *descendants(self.processes[node].pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def finish(self, timeout: float = 600, check: bool = True) -> list[subprocess.CompletedProcess]:
        """Every launcher's result once it exits, in node order; past `timeout` seconds (from now) the stragglers'
        process groups are killed. `check`: raise unless every launcher exited with 0."""
        deadline = time.monotonic() + timeout
        results = []
        for cmd, (out, err), process in zip(self.commands, self._logs, self.processes):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node = self.processes.index(process)
                self.signal(node, signal.SIGKILL)
                process.wait()
            texts = []
            for stream in (out, err):
                stream.seek(0)
                texts.append(stream.read())
                stream.close()
            results.append(subprocess.CompletedProcess(cmd, process.returncode, *texts))
        self._scratch.cleanup()
        failed = [r for r in results if r.returncode != 0]
        if check and failed:
            raise AssertionError("\n".join(f"node launcher failed ({r.returncode}): {' '.join(r.args[:8])} ...\n"
                                           f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}" for r in failed))
        if check:
            assert_no_allreduce_workspace_left(self.port)
        return results


def descendants(pid: int) -> list[int]:
    """Every living process under `pid` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        found.append(queue.pop(0))
        queue.extend(children.get(found[-1], []))
    return found


def train_on_nodes(form: str, *args: str, nodes: int = 2, ranks_per_node: int = 1,
                   node_dirs: list[Path] | None = None, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """`launch/train.py ARGS` on `nodes` loopback nodes (`NodeJob`) to the end; their results in node order. Past
    `timeout` seconds every launcher's process group is killed and the run fails."""
    return NodeJob(form, *args, nodes=nodes, ranks_per_node=ranks_per_node, node_dirs=node_dirs).finish(timeout)
