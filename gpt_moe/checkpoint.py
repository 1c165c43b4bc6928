"""Checkpoints: complete-only visibility, keep-last-N, resume selection.

Layout of a run's checkpoints (DeepSpeed writes the tag directories):

    runs/<run>/checkpoints/
        step_00000100/              DeepSpeed files (model states, ZeRO optimizer shards, expert files)
            client_rank00000.pt     our per-rank state (RNG states), written by each rank
            COMPLETE                JSON, written by rank 0 after every rank finished writing
        latest                      DeepSpeed's pointer, written before the save is complete:
                                    never trusted alone

A tag directory without COMPLETE (a save killed part-way) is ignored on resume and removed
when a newer checkpoint completes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_moe.errors import CheckpointError

COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(tag_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(tag_dir / COMPLETE, json.dumps({**info, "completed_at": time.time()}, indent=1))


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete tag directories, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*") if (p / COMPLETE).is_file())


def newest_complete(checkpoint_dir: Path) -> Path | None:
    done = complete_checkpoints(checkpoint_dir)
    return done[-1] if done else None


def read_complete_info(tag_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {COMPLETE} marker); "
                              "it was interrupted while saving, resume from an earlier one") from None


def prune(checkpoint_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than the
    newest complete. Returns what was removed. Rank 0 only, after the newest is marked complete."""
    done = complete_checkpoints(checkpoint_dir)
    if not done:
        return []
    newest = done[-1]
    doomed = done[:-keep_last] if keep_last > 0 else []
    doomed += [p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*")
               if p.is_dir() and not (p / COMPLETE).is_file() and p.name < newest.name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    path = tag_dir / f"client_rank{rank:05d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"rng": rng_state()}, tmp)
    os.replace(tmp, path)


def load_rank_state(tag_dir: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them (not when the world size grew)."""
    path = tag_dir / f"client_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)  # our own file: python/numpy RNG states are not tensors
    set_rng_state(state["rng"])
    return True
