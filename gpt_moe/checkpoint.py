"""Training checkpoints: tags, complete-only visibility, keep-last-N, per-rank RNG state, on-disk names.

Layout of a run's checkpoints (DeepSpeed writes the tag directories):

    runs/<run>/checkpoints/
        step_00000100/              DeepSpeed files (model states, ZeRO optimizer shards, expert files)
            client_rank00000.pt     our per-rank state (RNG states), written by each rank
            COMPLETE                JSON, written by rank 0 after every rank finished writing
        latest                      DeepSpeed's pointer, written before the save is complete:
                                    never trusted alone

A tag directory without COMPLETE (a save killed part-way) is ignored on resume and removed
when a newer checkpoint completes. Each complete tag also holds model_config.json and the
tokenizer, so `gpt_moe.loading` can build the model from it alone.

Expert parallelism writes one DeepSpeed file per global expert, `layer_L_expert_E_mp_rank_00_model_states.pt`,
whose keys are `{experts module}.deepspeed_moe.experts.deepspeed_experts.{E}.{gate_up_proj|down_proj}`
(`expert_key` / `parse_expert_key`: the one definition of that format).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_moe.atomic import AtomicFile, write_atomic
from gpt_moe.config import ModelConfig
from gpt_moe.errors import CheckpointError
from gpt_moe.tokenizer import TokenizerInfo

COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def mark_complete(tag_dir: Path, info: dict[str, Any]) -> None:
    write_atomic(tag_dir / COMPLETE, json.dumps({**info, "completed_at": time.time()}, indent=1))


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
    """Python, numpy and torch RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    with AtomicFile(tag_dir / f"client_rank{rank:05d}.pt") as f:
        torch.save({"rng": rng_state()}, f)


def load_rank_state(tag_dir: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them (not when the world size grew)."""
    path = tag_dir / f"client_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    return True


# ---------------------------------------------------------------------- what a tag holds besides DeepSpeed's files
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_INFO_FILE = "tokenizer_info.json"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
DEEPSPEED_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_EXPERT_KEY = re.compile(r"^(.*\.experts)\." + re.escape(DEEPSPEED_EXPERT_PREFIX) + r"(\d+)\.(\w+)$")


def expert_key(local_key_prefix: str, expert: int, name: str) -> str:
    """Key of one expert's weight in DeepSpeed's per-expert files: `{prefix}deepspeed_moe...{expert}.{name}`."""
    return f"{local_key_prefix}{DEEPSPEED_EXPERT_PREFIX}{expert}.{name}"


def parse_expert_key(key: str) -> tuple[str, int, str] | None:
    """(experts module name, expert id, weight name) of a key made by `expert_key`, or None."""
    match = _EXPERT_KEY.match(key)
    return (match[1], int(match[2]), match[3]) if match else None


def save_inference_files(tag_dir: Path, model_config: ModelConfig, tokenizer: TokenizerInfo, data_dir: Path) -> None:
    """What a checkpoint needs besides DeepSpeed's files to be used alone: model config and tokenizer."""
    write_atomic(tag_dir / MODEL_CONFIG_FILE, json.dumps(model_config.to_dict(), indent=1))
    write_atomic(tag_dir / TOKENIZER_INFO_FILE, json.dumps(tokenizer.to_dict(), indent=1))
    write_atomic(tag_dir / tokenizer.file, (Path(data_dir) / tokenizer.file).read_bytes())


