"""Checkpoints: complete-only visibility, keep-last-N, resume selection, and loading for inference.

Layout of a run's checkpoints (DeepSpeed writes the tag directories):

    runs/<run>/checkpoints/
        step_00000100/              DeepSpeed files (model states, ZeRO optimizer shards, expert files)
            client_rank00000.pt     our per-rank state (RNG states), written by each rank
            COMPLETE                JSON, written by rank 0 after every rank finished writing
        latest                      DeepSpeed's pointer, written before the save is complete:
                                    never trusted alone

A tag directory without COMPLETE (a save killed part-way) is ignored on resume and removed
when a newer checkpoint completes. Each complete tag also holds model_config.json and the
tokenizer, so `load_for_inference` needs nothing else: it merges the per-expert files of
expert-parallel runs (or ZeRO-3 partitions) into one model on CPU, without DeepSpeed's runtime,
reading tensors with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_moe.config import ModelConfig
from gpt_moe.errors import CheckpointError
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.tokenizer import TokenizerInfo

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
    path = tag_dir / f"client_rank{rank:05d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"rng": rng_state()}, tmp)
    os.replace(tmp, path)


def load_rank_state(tag_dir: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them (not when the world size grew)."""
    path = tag_dir / f"client_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    return True


# ---------------------------------------------------------------------- inference: no DeepSpeed runtime
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_INFO_FILE = "tokenizer_info.json"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
DEEPSPEED_EXPERT_KEY = re.compile(r"^(.*\.experts)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")


def save_inference_files(tag_dir: Path, model_config: ModelConfig, tokenizer: TokenizerInfo, data_dir: Path) -> None:
    """What a checkpoint needs besides DeepSpeed's files to be used alone: model config and tokenizer."""
    atomic_write_text(tag_dir / MODEL_CONFIG_FILE, json.dumps(model_config.to_dict(), indent=1))
    atomic_write_text(tag_dir / TOKENIZER_INFO_FILE, json.dumps(tokenizer.to_dict(), indent=1))
    shutil.copyfile(Path(data_dir) / tokenizer.file, tag_dir / tokenizer.file)


@dataclass
class LoadedModel:
    model: DeepSeekForCausalLM
    tokenizer: Any  # tiktoken.Encoding
    tokenizer_info: TokenizerInfo
    source: Path
    info: dict[str, Any]  # step, tokens_seen, val_loss, ... (empty for exported models without a card)


def find_newest_checkpoint(runs_dir: str | Path = "runs") -> Path | None:
    """The most recently completed checkpoint of any run under `runs_dir`."""
    candidates = [p for p in Path(runs_dir).glob(f"*/checkpoints/{TAG_PREFIX}*") if (p / COMPLETE).is_file()]
    return max(candidates, key=lambda p: (p / COMPLETE).stat().st_mtime, default=None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag directory, a run directory (its newest complete checkpoint) or an exported directory."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / COMPLETE).is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        newest = newest_complete(checkpoints)
        if newest is not None:
            return newest
    if path.name.startswith(TAG_PREFIX) and path.is_dir():
        read_complete_info(path)  # raises the "interrupted while saving" error
    raise CheckpointError(f"{path}: no checkpoint here (expected a run directory, a checkpoints/step_* directory "
                          "or an exported directory with config.json); train one with "
                          "`deepspeed launch/train.py --deepspeed ds_configs/zero2.json`")


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's state dict (HF layout, experts stacked) from a DeepSpeed checkpoint of any
    ZeRO stage and expert-parallel size, read on CPU without starting DeepSpeed's runtime."""
    info = read_complete_info(tag_dir)
    if info.get("zero_stage", 0) == 3:
        if info.get("ep_size", 1) > 1:
            raise CheckpointError(f"{tag_dir}: ZeRO-3 checkpoints with --ep-size > 1 cannot be consolidated yet; "
                                  "train with ZeRO-1/2 for expert parallelism")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
    state = dict(_load(tag_dir / "mp_rank_00_model_states.pt")["module"])
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for file in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE.search(file.name):
            continue
        for key, value in _load(file).items():
            match = DEEPSPEED_EXPERT_KEY.match(key)
            if not match:
                raise CheckpointError(f"{file}: unexpected key {key!r} in an expert file")
            prefix, expert_id, name = match.groups()
            experts.setdefault((prefix, name), {})[int(expert_id)] = value
    for (prefix, name), by_id in experts.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"{tag_dir}: experts of {prefix} are incomplete ({len(by_id)} files)")
        state[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in range(len(by_id))])
    return state


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Model + tokenizer from a training checkpoint (any ZeRO stage / EP size) or an exported directory."""
    from gpt_moe.tokenizer import load_saved_tokenizer

    source = resolve_checkpoint(path)
    if (source / "config.json").is_file():
        from gpt_moe.export import read_exported

        config, tokenizer_info, state, info = read_exported(source)
    else:
        try:
            config = ModelConfig.from_json(source / MODEL_CONFIG_FILE)
            tokenizer_info = TokenizerInfo.from_dict(json.loads((source / TOKENIZER_INFO_FILE).read_text()),
                                                     str(source / TOKENIZER_INFO_FILE))
        except FileNotFoundError as err:
            raise CheckpointError(f"{source}: {Path(err.filename).name} is missing; this checkpoint was not "
                                  "written by gpt-moe's trainer") from None
        state, info = consolidated_state_dict(source), read_complete_info(source)
    model = DeepSeekForCausalLM(config, seed=None)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=device, dtype=dtype).eval()
    for moe in model.moe_layers():  # the balancing bias stays fp32
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    tokenizer = load_saved_tokenizer(tokenizer_info, source)
    return LoadedModel(model, tokenizer, tokenizer_info, source, info)
