"""Loading a model for inference or export, from a training checkpoint or an exported directory.

Nothing here needs DeepSpeed's runtime or unpickles code: tensors are read with
`torch.load(weights_only=True)` or safetensors. A training checkpoint of any ZeRO stage and
expert-parallel size becomes one model on CPU: the per-expert files of expert-parallel runs are
stacked back into the experts' tensors (`consolidated_state_dict`), and ZeRO-3's partitions are
reassembled from the optimizer files (`zero3_state_dict`, which for EP=1 gives exactly DeepSpeed's
`zero_to_fp32` tensors and, unlike it, places expert partitions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_moe.checkpoint import (COMPLETE, EXPERT_FILE, MODEL_CONFIG_FILE, TAG_PREFIX, TOKENIZER_INFO_FILE,
                                load_data_only, newest_complete, parse_expert_key, read_complete_info)
from gpt_moe.config import ModelConfig, from_hf_config
from gpt_moe.errors import CheckpointError, GptMoeError
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.tokenizer import TokenizerInfo, load_saved_tokenizer

TRAIN_HINT = "train one with `deepspeed launch/train.py --deepspeed ds_configs/zero2.json`"


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) with its tokenizer and what is known of its training."""

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
                          f"or an exported directory with config.json); {TRAIN_HINT}")


def _load(path: Path) -> dict[str, Any]:
    return load_data_only(path)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's state dict (HF layout, experts stacked) from a DeepSpeed checkpoint of any
    ZeRO stage and expert-parallel size, read on CPU without starting DeepSpeed's runtime."""
    info = read_complete_info(tag_dir)
    if info.get("zero_stage", 0) == 3:
        return zero3_state_dict(tag_dir)
    state = dict(_load(tag_dir / "mp_rank_00_model_states.pt")["module"])
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for file in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE.search(file.name):
            continue
        for key, value in _load(file).items():
            parsed = parse_expert_key(key)
            if parsed is None:
                raise CheckpointError(f"{file}: unexpected key {key!r} in an expert file")
            prefix, expert_id, name = parsed
            experts.setdefault((prefix, name), {})[expert_id] = value
    for (prefix, name), by_id in experts.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"{tag_dir}: experts of {prefix} are incomplete ({len(by_id)} files)")
        state[f"{prefix}.{name}"] = torch.stack([by_id[i] for i in range(len(by_id))])
    return state


def zero3_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-3 checkpoint, reassembled from the ranks' partitions
    (`gpt_moe.zero_files`; routed experts stacked in global order) plus the module's buffers."""
    from gpt_moe.zero_files import ZeroCheckpoint

    zero = ZeroCheckpoint(tag_dir)
    if any(len(p.holders) > 1 for p in zero.parameters.values()) and not zero.info.get("expert_ranges"):
        raise CheckpointError(f"{tag_dir}: expert partitions but no expert_ranges in {COMPLETE} (saved by an older "
                              "gpt-moe); load it with that version")
    module = zero.model_states["module"]
    state = {name: module[name] for name in zero.model_states["buffer_names"] if name in module}
    state.update({name: zero.read(param, "fp32") for name, param in zero.parameters.items()})
    for alias, source in zero.model_states.get("shared_params", {}).items():  # tied embeddings
        state[alias] = state[source]
    return state


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Model + tokenizer from a training checkpoint (any ZeRO stage / EP size) or an exported directory.
    Any failure is one CheckpointError: a damaged file raises whatever its reader raises, and the entry
    points show one line for it, not a traceback."""
    try:
        return _load_for_inference(resolve_checkpoint(path), device, dtype)
    except GptMoeError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader's failure on a damaged file, reported in one line
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: cannot load this checkpoint ({type(err).__name__}: {first_line}); "
                              f"it may be damaged: {TRAIN_HINT} or export it again") from err


def _load_for_inference(source: Path, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
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
    for _, moe in model.moe_layers():  # the balancing bias stays fp32
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    tokenizer = load_saved_tokenizer(tokenizer_info, source)
    return LoadedModel(model, tokenizer, tokenizer_info, source, info)


# ---------------------------------------------------------------------- weights to fine-tune (--init-from)
@dataclass(frozen=True)
class Pretrained:
    """Where `--init-from` weights come from: a training checkpoint tag, a gpt-moe export, or a transformers
    `DeepseekV3ForCausalLM` directory (config.json + safetensors, no tokenizer record of ours)."""

    source: Path
    kind: str  # "checkpoint" | "export" | "transformers"
    config: ModelConfig
    tokenizer: TokenizerInfo | None  # None for a transformers directory

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's weights, fp32, experts stacked (read without unpickling code)."""
        if self.kind == "checkpoint":
            state = consolidated_state_dict(self.source)
        else:
            state = _safetensors_state(self.source, self.config)
        return {name: value.float() for name, value in state.items()}


def pretrained(path: str | Path) -> Pretrained:
    """Describes the weights at `path` (reading configs only); one CheckpointError when there are none."""
    try:
        return _pretrained(resolve_checkpoint(path))
    except GptMoeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: cannot read these weights ({type(err).__name__}: {first_line}); expected a "
                              "training checkpoint, a gpt-moe export or a transformers DeepseekV3 directory") from None


def _pretrained(source: Path) -> Pretrained:
    if not (source / "config.json").is_file():
        config = ModelConfig.from_json(source / MODEL_CONFIG_FILE)
        tokenizer = TokenizerInfo.from_dict(json.loads((source / TOKENIZER_INFO_FILE).read_text()),
                                            str(source / TOKENIZER_INFO_FILE))
        return Pretrained(source, "checkpoint", config, tokenizer)
    from gpt_moe.export import OUR_FILE

    if (source / OUR_FILE).is_file():
        ours = json.loads((source / OUR_FILE).read_text())
        return Pretrained(source, "export", ModelConfig.from_dict(ours["model_config"], str(source / OUR_FILE)),
                          TokenizerInfo.from_dict(ours["tokenizer"]))
    hf = json.loads((source / "config.json").read_text())
    if hf.get("model_type") != "deepseek_v3":
        raise CheckpointError(f"{source}/config.json: model_type {hf.get('model_type')!r}, expected deepseek_v3 "
                              "(a transformers DeepseekV3ForCausalLM directory)")
    return Pretrained(source, "transformers", from_hf_config(hf, name=source.name), None)


def _safetensors_state(directory: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """model*.safetensors (+ our mtp.safetensors) of an export or a transformers directory."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors")) + sorted(directory.glob("mtp.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state
