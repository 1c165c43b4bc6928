"""A model's weights read from disk: for inference and export (`load_for_inference`, `load_model`), or to fine-tune
(`open_weights` + `load_weights`, behind `--init-from`), from any directory `gpt_moe.checkpoint.model_dir`
describes.

    source = open_weights(directory)      # headers read: a checkpoint's, a layout-free one's, an export's or a
                                          # transformers directory's (gpt_moe.checkpoint.weights)
    check_weights(source, config)         # key set, shapes, dtypes; nothing read yet
    load_weights(model, source)           # one module at a time, a rank's own experts only, every value checked

Nothing here needs DeepSpeed's runtime or unpickles code: tensors are read with `torch.load(weights_only=True)`
(memory-mapped) or safetensors. A training checkpoint of any ZeRO stage and expert-parallel size becomes one model
on CPU: the per-expert files of expert-parallel runs give the experts' rows, ZeRO-3's partitions are reassembled
from the optimizer files (`zero3_state_dict` also gives exactly DeepSpeed's `zero_to_fp32` dictionary and, unlike
it, places expert partitions). A layout-free checkpoint gives its fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch

from gpt_moe.checkpoint.model_dir import EXPORT_RECORD_FILE, HF_CONFIG_FILE, TRAIN_HINT, ModelDirectory
from gpt_moe.checkpoint.records import MODEL_CONFIG_FILE, CheckpointRecord, TrainingFacts
from gpt_moe.checkpoint.reshard import LayoutFreeWeights
from gpt_moe.checkpoint.safetensors_weights import SafetensorsWeights
from gpt_moe.checkpoint.weights import DeepSpeedWeights, WeightSource, check_dtypes, check_weights
from gpt_moe.checkpoint.zero_files import ZeroCheckpoint
from gpt_moe.data.tokenizer import TokenizerInfo, load_saved_tokenizer
from gpt_moe.errors import CheckpointError, GptMoeError, first_line
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.hf_config import fp8_block_size
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import Experts


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode) with its tokenizer and what is known of its training."""

    model: DeepSeekForCausalLM
    tokenizer: Any  # tiktoken.Encoding
    tokenizer_info: TokenizerInfo
    source: Path  # the directory the weights came from (it holds the tokenizer file)
    training: TrainingFacts


def open_weights(directory: ModelDirectory) -> WeightSource:
    """The weights of any directory `ModelDirectory` describes, headers read, no tensor yet: a training
    checkpoint's (any ZeRO stage, EP size; layout-free), an export's or a transformers directory's (FP8 included)."""
    try:
        if directory.kind == "checkpoint":
            return DeepSpeedWeights(directory.path, directory.record, directory.config)
        if directory.kind == "layout-free":
            return LayoutFreeWeights(directory.path)
        block = None
        if directory.kind == "transformers":
            hf = json.loads((directory.path / HF_CONFIG_FILE).read_text(encoding="utf-8"))
            block = fp8_block_size(hf, str(directory.path / HF_CONFIG_FILE))
        return SafetensorsWeights(directory.path, directory.config, block)
    except GptMoeError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader's failure on a damaged file, reported in one line
        raise CheckpointError(f"{directory.path}: cannot load this checkpoint ({type(err).__name__}: "
                              f"{first_line(err)}); it may be damaged: {TRAIN_HINT} or export it again") from None


@contextlib.contextmanager
def every_rank_writes(params: list[torch.Tensor]) -> Iterator[bool]:
    """`load_weights`' default: the parameters are whole on this rank, which writes them."""
    yield True


Gather = Callable[[list[torch.nn.Parameter]], ContextManager[bool]]
"""A module's parameters -> a context in which they are whole, yielding whether this rank writes them."""


def load_weights(model: DeepSeekForCausalLM, source: WeightSource, gathered: Gather = every_rank_writes) -> str | None:
    """Reads `source` into `model` one module at a time (check the headers first: `check_weights`); the routed
    experts of an `Experts` module are the rows it holds (its `first_expert` on). `gathered(params)`: a context in
    which the module's parameters are whole, yielding whether this rank writes them (ZeRO-3: the engine's
    `deepspeed.zero.GatheredParameters`; by default every rank writes). Returns the first problem met while reading
    (a non-finite tensor, a damaged file) as a one-line message, or None: every rank finishes the walk, so that the
    collectives of `gathered` stay matched, and the caller decides together."""
    problem: str | None = None
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = [(prefix + n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        buffers = [(prefix + n, b) for n, b in module.named_buffers(recurse=False)
                   if n not in module._non_persistent_buffers_set]
        experts = range(module.first_expert, module.first_expert + module.num_local_experts) \
            if isinstance(module, Experts) else None
        params = [(name, p) for name, p in params if name in source.shapes]
        if params:
            with gathered([p for _, p in params]) as writes:
                if writes and problem is None:
                    problem = _read_each(source, params, experts)
        if problem is None:
            problem = _read_each(source, [(name, b) for name, b in buffers if name in source.shapes], None)
        source.release()
    return problem


def _read_each(source: WeightSource, tensors: list[tuple[str, torch.Tensor]], experts: range | None) -> str | None:
    for name, tensor in tensors:
        try:
            source.read_into(name, tensor.data, experts)
        except GptMoeError as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - a reader's failure on damaged data, as one line
            return f"{source.path}: cannot read {name} ({type(err).__name__}: {first_line(err)}); the file is damaged"
    return None


def read_weights(directory: ModelDirectory) -> dict[str, torch.Tensor]:
    """The whole model's state dict (our names, routed experts stacked, the MTP block included where the directory
    has one), each tensor in its stored dtype (FP8 weights dequantised to fp32), checked finite."""
    source = open_weights(directory)
    check_dtypes(source.dtypes, source.path)
    stored = {name: torch.float32 if dtype == torch.float8_e4m3fn else dtype for name, dtype in source.dtypes.items()}
    try:
        return {name: source.read(name, dtype=stored[name]) for name in source.shapes}
    finally:
        source.release()


def consolidated_state_dict(tag_dir: Path, record: CheckpointRecord) -> dict[str, torch.Tensor]:
    """The whole model's state dict (HF layout, experts stacked) from a DeepSpeed checkpoint of any ZeRO stage and
    expert-parallel size, read on CPU without starting DeepSpeed's runtime (ZeRO-3: `zero3_state_dict`)."""
    if record.layout.zero_stage == 3:
        return zero3_state_dict(tag_dir)
    config = ModelConfig.from_json(Path(tag_dir) / MODEL_CONFIG_FILE)
    source = DeepSpeedWeights(Path(tag_dir), record, config)
    return {name: source.read(name, dtype=source.dtypes[name]) for name in source.shapes}


def zero3_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-3 checkpoint, reassembled from the ranks' partitions
    (`gpt_moe.checkpoint.zero_files`; routed experts stacked in global order) plus the module's buffers and
    DeepSpeed's shared-parameter aliases: DeepSpeed's `zero_to_fp32` dictionary."""
    zero = ZeroCheckpoint(tag_dir)
    module = zero.model_states["module"]
    state = {name: module[name] for name in zero.model_states["buffer_names"] if name in module}
    state.update({name: zero.read(param, "fp32") for name, param in zero.parameters.items()})
    for alias, source in zero.model_states.get("shared_params", {}).items():  # tied embeddings
        state[alias] = state[source]
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
    model = load_model(directory, device, dtype)
    tokenizer = load_saved_tokenizer(directory.tokenizer, directory.path)
    return LoadedModel(model, tokenizer, directory.tokenizer, directory.path, directory.training)


def load_model(directory: ModelDirectory, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> DeepSeekForCausalLM:
    """The model of any directory (a transformers one included: no tokenizer needed), weights checked and read one
    tensor at a time, in eval mode on `device` in `dtype` (the balancing biases fp32). A directory without the MTP
    block its config names gives a model without one."""
    source = open_weights(directory)
    config = directory.config
    if not check_weights(source, config) and config.num_nextn_predict_layers:
        config = config.replace(num_nextn_predict_layers=0)
    model = DeepSeekForCausalLM(config, seed=None)
    problem = load_weights(model, source)
    if problem:
        raise CheckpointError(problem)
    model = model.to(device=device, dtype=dtype).eval()
    for _, moe in model.moe_layers():  # the balancing bias stays fp32
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    return model
