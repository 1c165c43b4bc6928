"""A model's weights read from disk: for inference and export (`load_for_inference`), or to fine-tune
(`read_weights`, behind `--init-from`), from any directory `gpt_moe.checkpoint.model_dir` describes.

Nothing here needs DeepSpeed's runtime or unpickles code: tensors are read with
`torch.load(weights_only=True)` or safetensors. A training checkpoint of any ZeRO stage and
expert-parallel size becomes one model on CPU: the per-expert files of expert-parallel runs are
stacked back into the experts' tensors (`consolidated_state_dict`), and ZeRO-3's partitions are
reassembled from the optimizer files (`zero3_state_dict`, which for EP=1 gives exactly DeepSpeed's
`zero_to_fp32` tensors and, unlike it, places expert partitions). A layout-free checkpoint gives its fp32
master weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_moe.checkpoint.deepspeed_files import EXPERT_FILE, load_data_only, parse_expert_key
from gpt_moe.checkpoint.model_dir import EXPORT_RECORD_FILE, MTP_FILE, TRAIN_HINT, ModelDirectory
from gpt_moe.checkpoint.records import COMPLETE, CheckpointRecord, TrainingFacts
from gpt_moe.checkpoint.reshard import LayoutFreeSource
from gpt_moe.checkpoint.zero_files import ZeroCheckpoint
from gpt_moe.data.tokenizer import TokenizerInfo, load_saved_tokenizer
from gpt_moe.errors import CheckpointError, GptMoeError, first_line
from gpt_moe.model.model import DeepSeekForCausalLM


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) with its tokenizer and what is known of its training."""

    model: DeepSeekForCausalLM
    tokenizer: Any  # tiktoken.Encoding
    tokenizer_info: TokenizerInfo
    source: Path  # the directory the weights came from (it holds the tokenizer file)
    training: TrainingFacts


def read_weights(directory: ModelDirectory) -> dict[str, torch.Tensor]:
    """The whole model's state dict (transformers' names, routed experts stacked, the MTP block included where the
    directory has one) as stored: a checkpoint's module weights (ZeRO-3 and layout-free: the fp32 masters), an
    export's or a transformers directory's safetensors."""
    if directory.kind == "checkpoint":
        return consolidated_state_dict(directory.path, directory.record)
    if directory.kind == "layout-free":
        return layout_free_state_dict(directory.path)
    return safetensors_state(directory.path, directory.config.tie_word_embeddings)


def consolidated_state_dict(tag_dir: Path, record: CheckpointRecord) -> dict[str, torch.Tensor]:
    """The whole model's state dict (HF layout, experts stacked) from a DeepSpeed checkpoint of any
    ZeRO stage and expert-parallel size, read on CPU without starting DeepSpeed's runtime."""
    if record.layout.zero_stage == 3:
        return zero3_state_dict(tag_dir)
    state = dict(load_data_only(tag_dir / "mp_rank_00_model_states.pt")["module"])
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for file in sorted(tag_dir.iterdir()):
        if not EXPERT_FILE.search(file.name):
            continue
        for key, value in load_data_only(file).items():
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
    (`gpt_moe.checkpoint.zero_files`; routed experts stacked in global order) plus the module's buffers."""
    zero = ZeroCheckpoint(tag_dir)
    if any(len(p.holders) > 1 for p in zero.parameters.values()) and not zero.record.expert_ranges:
        raise CheckpointError(f"{tag_dir}: expert partitions but no expert_ranges in {COMPLETE} (saved by an older "
                              "gpt-moe); load it with that version")
    module = zero.model_states["module"]
    state = {name: module[name] for name in zero.model_states["buffer_names"] if name in module}
    state.update({name: zero.read(param, "fp32") for name, param in zero.parameters.items()})
    for alias, source in zero.model_states.get("shared_params", {}).items():  # tied embeddings
        state[alias] = state[source]
    return state


def layout_free_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights and the buffers of a layout-free checkpoint (`python launch/reshard.py`)."""
    source = LayoutFreeSource(directory)
    state = dict(source.run_state()["buffers"])
    for name in source.names:
        state[name] = source.full_states(name, ("fp32",))["fp32"]
    return state


def safetensors_state(directory: Path, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """model*.safetensors (+ our mtp.safetensors) of an export or a transformers directory."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("model*.safetensors")) + sorted(directory.glob(MTP_FILE))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    if tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Model + tokenizer from a training checkpoint (any ZeRO stage / EP size, or layout-free) or an exported
    directory. Any failure is one CheckpointError: a damaged file raises whatever its reader raises, and the entry
    points show one line for it, not a traceback."""
    directory = ModelDirectory.open(path)
    if directory.tokenizer is None:
        raise CheckpointError(f"{directory.path}: {EXPORT_RECORD_FILE} is missing; not a gpt-moe export (python "
                              "launch/export.py CHECKPOINT OUT_DIR makes one), and a transformers directory brings no "
                              "tokenizer of ours")
    try:
        return _load_for_inference(directory, device, dtype)
    except GptMoeError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader's failure on a damaged file, reported in one line
        raise CheckpointError(f"{path}: cannot load this checkpoint ({type(err).__name__}: {first_line(err)}); "
                              f"it may be damaged: {TRAIN_HINT} or export it again") from err


def _load_for_inference(directory: ModelDirectory, device: str | torch.device, dtype: torch.dtype) -> LoadedModel:
    state = read_weights(directory)
    model = DeepSeekForCausalLM(directory.config, seed=None)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{directory.path}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device=device, dtype=dtype).eval()
    for _, moe in model.moe_layers():  # the balancing bias stays fp32
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    tokenizer = load_saved_tokenizer(directory.tokenizer, directory.path)
    return LoadedModel(model, tokenizer, directory.tokenizer, directory.path, directory.training)
