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
        return zero3_state_dict(tag_dir, info)
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


class _DeepSpeedRecord:
    """Stands in for the two DeepSpeed classes pickled into ZeRO optimizer files (ZeroStageEnum,
    LossScaler), so they load with `weights_only=True` and without importing DeepSpeed."""

    def __init__(self, *args: Any) -> None:
        self.args = args


def _load_zero_optimizer_file(path: Path) -> dict[str, Any]:
    stand_ins = [(_DeepSpeedRecord, "deepspeed.runtime.zero.config.ZeroStageEnum"),
                 (_DeepSpeedRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler")]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]


def zero3_state_dict(tag_dir: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Reassembles the fp32 master weights of a ZeRO-3 checkpoint.

    ZeRO-3 splits every parameter into equal, zero-padded slices, one per rank of its partition
    group, and each rank stores its slices of a sub-group's parameters one after the other
    (`fp32_flat_groups[sub_group]`, in the order of `param_shapes`). Ordinary parameters are
    partitioned over all ranks; under expert parallelism the routed experts are partitioned over
    the ranks that hold the same experts (DeepSpeed records each rank's partition ranks per
    sub-group; `expert_ranges` in COMPLETE says which experts a rank holds), and their stacks are
    concatenated in expert order."""
    world = info["world_size"]
    models = [_load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt") for rank in range(world)]
    optim_files = [sorted(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")) for rank in range(world)]
    if not all(len(files) == 1 for files in optim_files):
        raise CheckpointError(f"{tag_dir}: expected one ZeRO-3 optimizer file per rank for {world} ranks")
    optimizers = [_load_zero_optimizer_file(files[0]) for files in optim_files]
    flat = [optimizer["fp32_flat_groups"] for optimizer in optimizers]  # [rank][sub_group] 1-D fp32

    recorded = [optimizer.get("ds_zero_partition_groups") for optimizer in optimizers]

    def holder_sets(sub_group: int) -> list[tuple[int, ...]]:
        """The groups of ranks that partition this sub-group among themselves (all ranks when unrecorded)."""
        if not all(recorded):
            return [tuple(range(world))]
        return sorted({tuple(groups[sub_group]["partition_ranks"]) for groups in recorded})

    if len({len(holder_sets(g)) for g in range(len(flat[0]))}) > 1 and not info.get("expert_ranges"):
        raise CheckpointError(f"{tag_dir}: expert partitions but no expert_ranges in {COMPLETE} (saved by an older "
                              "gpt-moe); load it with that version")

    state = {name: value for name, value in models[0]["module"].items() if name in models[0]["buffer_names"]}
    expert_stacks: dict[str, dict[int, torch.Tensor]] = {}
    sub_group, used = 0, 0
    for group_index, shapes in enumerate(models[0]["param_shapes"]):
        for param_index, (name, shape) in enumerate(shapes.items()):
            holders = holder_sets(sub_group)
            numel, part = shape.numel(), -(-shape.numel() // len(holders[0]))
            for ranks in holders:
                own_shape = list(models[ranks[0]]["param_shapes"][group_index].values())[param_index]
                pieces = [flat[rank][sub_group][used: used + part] for rank in ranks]
                value = torch.cat(pieces)[:numel].view(own_shape).clone()
                if len(holders) == 1:
                    state[name] = value
                else:
                    first_expert = info["expert_ranges"][ranks[0]][0]
                    expert_stacks.setdefault(name, {})[first_expert] = value
            used += part
            if used == flat[0][sub_group].numel():
                sub_group, used = sub_group + 1, 0
    if sub_group != len(flat[0]) or used:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 partitions do not match the recorded parameter shapes")
    for name, by_first in expert_stacks.items():
        state[name] = torch.cat([by_first[first] for first in sorted(by_first)])
    for alias, source in models[0].get("shared_params", {}).items():  # tied embeddings
        state[alias] = state[source]
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
