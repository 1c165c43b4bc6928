"""Whose each file of a checkpoint tag is, and whether a tag directory holds the files a reader needs: the check that
makes a checkpoint written on node-local disks usable only once gathered. Torch-free.

On node-local disks (`gpt_moe.train.disks`) each node writes its own ranks' files into its own tag directory, and
every node's COMPLETE record lists the files of each node (`records.NodeFiles`). A reader of the whole checkpoint
(resharding, export, the app, `--init-from`, a resume in another layout) needs every listed file; DeepSpeed's loader
on rank r of a resume in the same layout needs only rank r's (`rank_files`). Before anything is read, a missing file
is one line naming it, the node and host that hold it, and the command that gathers the tag into one directory:

    rsync -a node1:/path/RUN/checkpoints/step_N/ /path/RUN/checkpoints/step_N/

A record written on a shared file system lists nothing (every file is in the one tag directory): nothing to check.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from gpt_moe.checkpoint.records import CheckpointRecord, NodeFiles
from gpt_moe.errors import CheckpointError

EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
"""DeepSpeed's file of one routed expert of one MoE layer (ZeRO-1/2 with expert parallelism): layer, global expert."""
RANK_FILE = re.compile(r"(?:zero_pp_rank_|client_rank)(\d+)[_.]")
"""A file of one rank: its ZeRO partition (optimizer states; model states under ZeRO-3) or our RNG states."""
SHOWN = 4
"""Missing files named in an error line; the rest are counted."""


def tag_files(tag_dir: Path) -> list[str]:
    """The names of the files in `tag_dir` as written so far (hidden temporaries and subdirectories left out)."""
    return sorted(p.name for p in Path(tag_dir).iterdir() if p.is_file() and not p.name.startswith("."))


def rank_files(listed: Iterable[str], rank: int, experts: tuple[int, int] | None) -> set[str]:
    """Those of `listed` that DeepSpeed's loader reads on rank `rank` (which holds routed experts [first, end), or
    None): the rank's own files, the files of the experts it holds, and the files of no rank (ZeRO-1/2's
    model-states file)."""
    needed = set()
    for name in listed:
        expert, owner = EXPERT_FILE.search(name), RANK_FILE.search(name)
        if expert is not None:
            if experts is not None and experts[0] <= int(expert[2]) < experts[1]:
                needed.add(name)
        elif owner is None or int(owner[1]) == rank:
            needed.add(name)
    return needed


def missing_files(tag_dir: Path, record: CheckpointRecord, rank: int | None = None) -> dict[str, list[NodeFiles]]:
    """The files `record` lists per node that `tag_dir` lacks (all of them, or with `rank` those DeepSpeed's loader
    reads on that rank), each with the nodes that hold it; {} for a record that lists none (a shared disk)."""
    if not record.nodes:
        return {}
    listed = {name for node in record.nodes for name in node.files}
    if rank is not None:
        ranges = record.expert_ranges
        listed = rank_files(listed, rank, ranges[rank] if ranges and rank < len(ranges) else None)
    present = {path.name for path in Path(tag_dir).iterdir()} if Path(tag_dir).is_dir() else set()
    return {name: [node for node in record.nodes if name in node.files] for name in sorted(listed - present)}


def require_files(tag_dir: Path, record: CheckpointRecord, rank: int | None = None) -> None:
    """CheckpointError (one line) unless `tag_dir` holds the files `missing_files` looks for: it names them, the
    node and host holding them, and the rsync that gathers them."""
    missing = missing_files(tag_dir, record, rank)
    if not missing:
        return
    holders: dict[NodeFiles, list[str]] = {}
    for name, nodes in missing.items():
        holders.setdefault(nodes[0], []).append(name)
    where = "; ".join(f"{', '.join(names[:SHOWN])}{f' and {len(names) - SHOWN} more' if len(names) > SHOWN else ''} "
                      f"on node {node.node} ({node.host})" for node, names in holders.items())
    who = f"rank {rank} needs" if rank is not None else "missing"
    tag = Path(tag_dir).absolute()
    gather = " and ".join(f"rsync -a {node.host}:{tag}/ {tag}/" for node in holders)
    raise CheckpointError(f"{tag_dir}: written on node-local disks and not gathered here: {who} {where}; gather it "
                          f"first: {gather} (docs/training.md, Many nodes)")
