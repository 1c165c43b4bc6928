"""Shared or node-local disks: which one a run has, found out at its start, and who writes what in each.

Every node runs with the same relative paths (`--run-dir runs/x --data data/x`). Either they lead to one file system
that every node sees (shared), or each node has its own (node-local: its own runs/ and data/). At start global rank
0 writes a file of a fresh random name into the run directory and each node's local rank 0 looks for it: every node
sees it (shared), only node 0 does (node-local), or some do and some do not (one error). A name never looked up
before cannot be answered from a file-system cache that still remembers the directory without it.

|            | shared                                         | node-local                                         |
| ---------- | ---------------------------------------------- | -------------------------------------------------- |
| data       | prepared once by global rank 0; the others     | prepared by each node's local rank 0; every node's |
|            | wait at a barrier                              | manifest must be the same (`content_sha256`)       |
| checkpoint | each file written once; COMPLETE by rank 0     | each node writes its own ranks' files (DeepSpeed's |
|            | after every rank's files are written           | `use_node_local_storage`: the model-states file on |
|            |                                                | every node); the run lock, the configs, the        |
|            |                                                | inference files and the same COMPLETE on every     |
|            |                                                | node, listing which node holds which files         |
| resume     | the newest complete tag                        | every node must find the same newest tag           |
| logs       | rank 0                                         | rank 0 (node 0's disk)                             |

A checkpoint of node-local disks is read elsewhere once gathered into one directory (`gpt_moe.checkpoint.node_files`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.atomic import write_atomic
from gpt_moe.checkpoint.node_files import tag_files
from gpt_moe.checkpoint.records import COMPLETE, NodeFiles
from gpt_moe.errors import CheckpointError, ConfigError, DataError
from gpt_moe.train.engine import Distributed
from gpt_moe.train.plan import ResumePlan, RunPlan

log = logging.getLogger(__name__)

SHARED, NODE_LOCAL = "shared", "node-local"
PROBE_PREFIX = ".disks-probe-"
"""The file global rank 0 writes into the run directory at start (removed once every node has looked)."""


@dataclass(frozen=True)
class Node:
    """One node of the run: its index (launch order), its host name and the global ranks it runs."""

    index: int
    host: str
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Disks:
    """The run's disks as this rank (`rank`) sees them: `mode` SHARED or NODE_LOCAL, and the nodes."""

    mode: str
    rank: int
    nodes: tuple[Node, ...]

    @property
    def node_local(self) -> bool:
        return self.mode == NODE_LOCAL

    @property
    def node(self) -> Node:
        """This rank's node."""
        return next(node for node in self.nodes if self.rank in node.ranks)

    @property
    def writer(self) -> bool:
        """Whether this rank writes what a run directory holds once (the lock, the configs, the inference files,
        COMPLETE, the prepared default data): global rank 0 on a shared disk, each node's first rank on its own."""
        return self.rank == (self.node.ranks[0] if self.node_local else 0)

    def describe(self, run_dir: Path) -> str:
        """The banner's line."""
        count = len(self.nodes)
        if not self.node_local:
            where = f"all {count} nodes see one {run_dir}" if count > 1 else "one node"
            return f"shared ({where}): data prepared once, each checkpoint file written once"
        return (f"node-local: each of the {count} nodes has its own {run_dir} and data, and writes its own ranks' "
                "checkpoint files; gather a checkpoint with rsync to use it elsewhere (docs/training.md, Many nodes)")

    def per_node(self, context: Distributed, value: Any) -> list[Any]:
        """Each node's `value` (that of its first rank), in node order, on every rank (every rank calls this)."""
        values = context.gather(value)
        return [values[node.ranks[0]] for node in self.nodes]

    def node_files(self, context: Distributed, tag_dir: Path) -> tuple[NodeFiles, ...] | None:
        """Which node holds which files of checkpoint `tag_dir` (listed by each node's writer once every rank has
        written its files); None on a shared disk, where all of them are in the one directory."""
        if not self.node_local:
            return None
        listing = [name for name in tag_files(tag_dir) if name != COMPLETE] if self.writer else []
        return tuple(NodeFiles(node.index, node.host, node.ranks, tuple(files))
                     for node, files in zip(self.nodes, self.per_node(context, listing)))

    def check_same_data(self, context: Distributed, directories: Sequence[tuple[Path, str]]) -> None:
        """DataError on every rank unless every node's data (directory, manifest `content_sha256`) is the same."""
        refuse_different_data(self.nodes, directories, self.per_node(context, [digest for _, digest in directories]))

    def check_same_resume(self, context: Distributed, resume: ResumePlan | None, flag: str) -> None:
        """CheckpointError on every rank unless every node resumes the same checkpoint (or none)."""
        refuse_different_resumes(self.nodes, self.per_node(context, resume.tag.name if resume else None), flag)


def disks_mode(run_dir: Path, seen: Sequence[bool]) -> str:
    """SHARED when every node (node 0 first) saw the file global rank 0 wrote into `run_dir`, NODE_LOCAL when only
    node 0 did; ConfigError naming the nodes otherwise."""
    seeing = [node for node, saw in enumerate(seen) if saw]
    if len(seeing) == len(seen):
        return SHARED
    if seeing == [0]:
        return NODE_LOCAL
    blind = [node for node, saw in enumerate(seen) if not saw]
    raise ConfigError(f"--run-dir {run_dir}: nodes {seeing} see the one node 0 writes, nodes {blind} do not; every "
                      "node must see one shared file system there, or each its own disk (node-local)")


def refuse_different_data(nodes: Sequence[Node], directories: Sequence[tuple[Path, str]],
                          found: Sequence[Sequence[str]]) -> None:
    """DataError naming the first directory whose manifest digest differs between the nodes (`found[node]`: that
    node's digest of each of `directories`)."""
    if all(list(digests) == list(found[0]) for digests in found):
        return
    which = next(i for i in range(len(directories)) if len({digests[i] for digests in found}) > 1)
    seen = ", ".join(f"node {node.index} {digests[which][:12]}" for node, digests in zip(nodes, found))
    raise DataError(f"{directories[which][0]}: the nodes hold different data (manifest sha256 without its creation "
                    f"time: {seen}); prepare it with the same data_prep command and version on every node, or copy "
                    "one node's directory to the others")


def refuse_different_resumes(nodes: Sequence[Node], found: Sequence[str | None], flag: str) -> None:
    """CheckpointError unless every node resumes the same tag (`found[node]`: its name, or None)."""
    if len(set(found)) == 1:
        return
    seen = ", ".join(f"node {node.index} {tag or 'none'}" for node, tag in zip(nodes, found))
    raise CheckpointError(f"--resume {flag}: the nodes find different checkpoints to resume ({seen}); each node "
                          "resumes from its own disk: copy the newest complete checkpoint to the nodes that lack it "
                          "(rsync, docs/training.md, Many nodes), or give --resume a tag every node holds")


def detect_disks(run_dir: Path, context: Distributed) -> Disks:
    """The run's disks (see the module docstring); every rank calls it after the process group started, with the
    run directory made on every node. ConfigError on every rank when some nodes share the run directory and
    others do not."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = f"{PROBE_PREFIX}{secrets.token_hex(8)}" if context.is_rank0 else None
    if name is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / name, "")
    name = context.from_rank0(name)  # sent once written
    sees = (run_dir / name).is_file() if local_rank == 0 else None
    places = context.gather((local_rank, socket.gethostname(), sees))
    if context.is_rank0:
        (run_dir / name).unlink(missing_ok=True)  # every node has looked
    starts = [rank for rank, (local, _, _) in enumerate(places) if local == 0]
    nodes = tuple(Node(i, places[first][1], tuple(range(first, end)))
                  for i, (first, end) in enumerate(zip(starts, [*starts[1:], context.world])))
    return Disks(disks_mode(run_dir, [bool(places[node.ranks[0]][2]) for node in nodes]), context.rank, nodes)


def planned_for(plan: RunPlan, disks: Disks) -> RunPlan:
    """`plan` on these disks: the banner says which, and DeepSpeed's `checkpoint.use_node_local_storage` follows
    them (on node-local disks each node's local rank 0 writes the model-states file its ranks load)."""
    ds_config, checkpoint = plan.ds_config, plan.ds_config.get("checkpoint", {})
    if disks.node_local or checkpoint.get("use_node_local_storage"):
        ds_config = {**ds_config, "checkpoint": {**checkpoint, "use_node_local_storage": disks.node_local}}
    if disks.node_local and plan.zero_stage < 3 and plan.train.ep_size > 1 and disks.rank == 0:
        log.warning("node-local disks with --ep-size %d under ZeRO-%d: DeepSpeed writes the model-states file and "
                    "each expert's file on one node only, so resuming needs the checkpoint gathered onto every node "
                    "first (ZeRO-3 writes every rank's files on its own node)", plan.train.ep_size, plan.zero_stage)
    return dataclasses.replace(plan, ds_config=ds_config, disks=disks.describe(plan.run_dir))
