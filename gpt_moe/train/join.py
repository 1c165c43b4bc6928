"""The start of a multi-rank run: every rank joins within a bounded time, or the run ends saying who is missing.

DeepSpeed's launchers start each node's ranks apart (pdsh over ssh from node 0, or one `deepspeed --no_ssh` launcher
per node). When one node's ranks never start (an unreachable host, a refused ssh, a launcher that failed), nothing
tells the ranks that did: torch's rendezvous holds them for the whole process-group timeout (--dist-timeout, 10
minutes by default), then fails without saying which node (measured with --dist-timeout 30: "DistStoreError: Timed
out after 31 seconds waiting for clients. 1/2 clients joined."). So before torch's rendezvous every rank joins on the
master's store itself (MASTER_ADDR:MASTER_PORT; rank 0's server is the one torch's rendezvous then shares) and waits
at most --join-timeout seconds for the others; past that rank 0 names the ranks, and their node, that did not come.

torchrun's ranks skip this: its agents rendezvous with each other (with their own timeout) before any of them starts
a rank, so its ranks always meet at once, on the agent's store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import timedelta

import torch.distributed as dist

from gpt_moe.errors import GptMoeError, first_line
from gpt_moe.train.config import JOIN_TIMEOUT_S
from gpt_moe.train.plan import launcher_ranks_per_node

KEY = "gpt_moe/join/"  # + rank: that rank joined
JOINED, ALL_JOINED = KEY + "count", KEY + "all"


class JoinError(GptMoeError, RuntimeError):
    """Not every rank of the run joined in time."""


def span_list(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7": ranks or nodes as a short list."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def missing_ranks_named(missing: list[int], world: int, environ: Mapping[str, str]) -> str:
    """The missing ranks, e.g. "rank 1 (node 1 of 2)": with their nodes in the launcher's order (the hostfile's
    lines) where the nodes are of equal size: the world divides by the ranks the launcher started on this node
    (`launcher_ranks_per_node`) into as many nodes as it says there are (the deepspeed launcher's CROSS_SIZE)."""
    names = f"rank{'s' if len(missing) > 1 else ''} {span_list(missing)}"
    per_node = launcher_ranks_per_node(environ)
    if per_node <= 0 or world % per_node or environ.get("CROSS_SIZE", str(world // per_node)) != str(world // per_node):
        return names
    nodes = sorted({r // per_node for r in missing})
    return f"{names} (node{'s' if len(nodes) > 1 else ''} {span_list(nodes)} of {world // per_node})"


def join_all_ranks(join_timeout_s: float = JOIN_TIMEOUT_S,
                   environ: Mapping[str, str] = os.environ) -> dist.TCPStore | None:
    """Waits until every rank of the world the launcher set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in
    `environ`) has joined, at most `join_timeout_s` seconds from this rank's arrival; raises a one-line `JoinError`
    past that (rank 0 names the missing ranks and nodes). Returns the store, which the caller keeps until torch's
    rendezvous has run (on rank 0 it holds the server torch's store then shares); None where there is nothing to
    join (one rank, or torchrun's agents did it)."""
    world, rank = int(environ.get("WORLD_SIZE", "1")), int(environ.get("RANK", "0"))
    if world <= 1 or environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    master = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
    within = f"within {join_timeout_s:g} s (--join-timeout)"
    deadline = time.monotonic() + join_timeout_s
    try:
        # the settings torch's env:// rendezvous uses, so that its store shares this server (multi_tenant)
        store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world, is_master=rank == 0,
                              timeout=timedelta(seconds=join_timeout_s), wait_for_workers=False, multi_tenant=True)
    except dist.DistError as err:
        raise JoinError(f"rank {rank} could not reach the run's master {master} (rank 0's node) {within}: "
                        f"{first_line(err)}") from None
    store.set(f"{KEY}{rank}", "1")
    store.add(JOINED, 1)
    if rank != 0:
        try:
            # rank 0 is there (its server answered), so it decides within join_timeout_s of now: all joined, or
            # it ends and its server closes, which ends this wait at once; the doubled wait covers only latency
            store.wait([ALL_JOINED], timedelta(seconds=2 * join_timeout_s))
        except dist.DistError:
            raise JoinError(f"rank {rank}: not every rank joined the run at {master} {within} (rank 0's error "
                            "names the missing ones)") from None
        return store
    while store.add(JOINED, 0) < world:  # a count read 20 times a second (a timed-out wait logs torch warnings)
        if time.monotonic() > deadline:
            missing = [r for r in range(world) if not store.check([f"{KEY}{r}"])]
            named = missing_ranks_named(missing, world, environ)
            raise JoinError(f"{named} did not join the run at {master} {within}; {world - len(missing)} of "
                            f"{world} ranks did. Not started by the node's launcher (an unreachable host, a refused "
                            "ssh: see the launcher's lines above) or failed before joining; a node that starts "
                            "later than the others needs a longer --join-timeout")
        time.sleep(0.05)
    store.set(ALL_JOINED, "1")
    return store
