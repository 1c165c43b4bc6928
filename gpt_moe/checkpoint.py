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

import errno
import json
import pickle
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


COMPLETE_KEYS = ("step", "world_size", "ep_size", "zero_stage")


def read_complete_info(tag_dir: Path) -> dict[str, Any]:
    """The COMPLETE record of a checkpoint tag; CheckpointError saying what `tag_dir` is when it has none."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        if not tag_dir.is_dir():
            raise CheckpointError(f"{tag_dir}: no such checkpoint directory; expected runs/<run>/checkpoints/"
                                  f"{TAG_PREFIX}N or a run directory")
        if not any(tag_dir.glob("*.pt")):
            raise CheckpointError(f"{tag_dir}: not a checkpoint (no {COMPLETE} marker and no DeepSpeed files); "
                                  f"expected runs/<run>/checkpoints/{TAG_PREFIX}N or a run directory")
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {COMPLETE} marker); "
                              "it was interrupted while saving, resume from an earlier one")
    try:
        info = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{marker}: not valid JSON ({err}); the checkpoint is damaged, "
                              "resume from an earlier one") from None
    missing = [key for key in COMPLETE_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise CheckpointError(f"{marker}: lacks {', '.join(missing)}; the checkpoint is damaged or was not "
                              "written by gpt-moe, resume from an earlier one")
    return info


# DeepSpeed pickles three of its own classes into its checkpoint files: small records of plain values
DEEPSPEED_RECORDS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class DeepSpeedRecord:
    """Stands in for DeepSpeed's pickled record classes (DEEPSPEED_RECORDS), so that checkpoint files load
    with `weights_only=True` without importing DeepSpeed; the record's values are kept in `args`."""

    def __init__(self, *args: Any) -> None:
        self.args = args


def load_data_only(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors, containers, numbers, strings and DeepSpeed's records only.
    Anything else in the pickle (a class, a function, a `__reduce__` payload) is refused with a
    CheckpointError naming what it found; it is never run."""
    try:
        with torch.serialization.safe_globals([(DeepSpeedRecord, name) for name in DEEPSPEED_RECORDS]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it pickles {found[1]}" if found else (str(err).strip().splitlines() or ["unpicklable"])[0][:120]
        raise CheckpointError(f"{path}: holds more than tensors and plain data ({what}); refusing to load it: "
                              "a loader that unpickles freely would run code from it; use only checkpoints written "
                              "by gpt-moe that you trust") from None


def check_data_only(tag_dir: Path) -> None:
    """Every file DeepSpeed's loader would unpickle (`*.pt` in the tag) holds data only; CheckpointError naming
    the first that does not. DeepSpeed loads with `weights_only=False`, which runs whatever code a pickle
    carries: this check runs first, with the safe loader, so a planted payload is refused, not executed."""
    for file in sorted(Path(tag_dir).rglob("*.pt")):
        try:
            load_data_only(file, mmap=True)
        except CheckpointError:
            raise
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"{file}: unreadable ({reason}); the checkpoint is damaged, resume from an "
                                  "earlier one") from None


def describe_save_failure(err: BaseException, checkpoint_dir: Path) -> str:
    """Why a save failed, in words: the OS's reason, or "no space left" when the disk is (nearly) full --
    torch.save reports a full disk only as "unexpected pos"."""
    free = shutil.disk_usage(checkpoint_dir if checkpoint_dir.exists() else checkpoint_dir.parent).free
    if getattr(err, "errno", None) == errno.ENOSPC or free < 64 * 1024 ** 2:
        return f"no space left on the device; {free / 1024 ** 2:.0f} MiB free now"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


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


ROUTED_EXPERT_PARAM = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def is_routed_expert_param(name: str) -> bool:
    """A stacked routed-expert weight of the model (`...mlp.experts.gate_up_proj`): [n_experts, ...]."""
    return ROUTED_EXPERT_PARAM.search(name) is not None


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


