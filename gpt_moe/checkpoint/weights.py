"""A model's weights on disk behind one interface, read one tensor (or one range of routed experts) at a time and
checked as they are read.

    source = open_weights(directory)           # gpt_moe.checkpoint.loading: the source for any ModelDirectory
    check_weights(source, config)              # key set, shapes and dtypes from the headers: nothing read yet
    source.read_into(name, param.data)         # one tensor, converted into the destination's dtype
    source.read_into(name, experts.gate_up_proj.data, experts=range(8, 16))   # rows 8..15 of a stacked expert weight
    source.stats                               # bytes read so far (routed experts separately)
    source.release()                           # unmap what was read (between parameters)

Names are ours (transformers' deepseek_v3 layout, routed experts stacked: `...mlp.experts.gate_up_proj`
[n_experts, 2 * moe_intermediate, hidden], `...mlp.experts.down_proj` [n_experts, hidden, moe_intermediate]),
whatever the files call them. A reader reads only what is asked: the rows of the experts a rank holds, one tensor at
a time, from memory-mapped files. Every tensor read is checked finite (`check_finite`, one pass); the headers are
checked before anything is read (`check_weights`): the key set, each shape and each dtype (floating tensors only,
all in one dtype but for the documented exceptions, `check_dtypes`).

Sources: `DeepSpeedWeights` here (a training checkpoint of any ZeRO stage and EP size), `LayoutFreeWeights`
(`gpt_moe.checkpoint.reshard`) and `SafetensorsWeights` (`gpt_moe.checkpoint.safetensors_weights`: exports and
transformers directories, FP8 included).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_moe.checkpoint.deepspeed_files import is_routed_expert_param, load_data_only, parse_expert_key
from gpt_moe.checkpoint.node_files import EXPERT_FILE, require_files
from gpt_moe.checkpoint.records import CheckpointRecord
from gpt_moe.checkpoint.zero_files import ZeroCheckpoint
from gpt_moe.errors import CheckpointError
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM, mtp_prefix

FP32_ALLOWED = (".mlp.gate.weight", ".e_score_correction_bias")
"""Tensors that may be float32 beside weights of another dtype: the routers (transformers keeps `gate.weight` and
the balancing bias in fp32; our exports keep the bias in fp32). The other exception is FP8 weights with their
scales (`gpt_moe.checkpoint.fp8`)."""
NO_BIAS_IN_V2 = ".e_score_correction_bias"
"""Softmax-routed (deepseek_v2) weights have no balancing bias: ours stays zero, as the model is built."""
FINITE_CHUNK = 1 << 24  # elements checked at a time: the check's temporary stays at 16 MB


@dataclass
class ReadStats:
    """What a source has read from its files: bytes copied out of them (the routed experts' part separately)."""

    bytes: int = 0
    expert_bytes: int = 0
    tensors: int = 0

    def add(self, tensor: torch.Tensor, expert: bool) -> None:
        size = tensor.numel() * tensor.element_size()
        self.bytes += size
        self.expert_bytes += size if expert else 0


class WeightSource:
    """The weights of one directory: `shapes` (our names -> full shapes, routed experts stacked) and `dtypes` (as
    stored) from the headers; `read_into` reads one tensor. Subclasses implement `_read_into`."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def __init__(self, path: Path) -> None:
        self.path, self.stats = Path(path), ReadStats()
        self.shapes, self.dtypes = {}, {}

    def read_into(self, name: str, out: torch.Tensor, experts: range | None = None) -> None:
        """Writes tensor `name` (for a routed-expert weight: the experts `experts`, all by default) into `out`,
        converted to out's dtype; CheckpointError naming it when a value is not finite."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.path}: has no tensor {name}")
        with torch.no_grad():
            self._read_into(name, out, experts)
        check_finite(out, name, self.path)
        self.stats.tensors += 1

    def read(self, name: str, experts: range | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` (rows `experts` of a routed-expert weight) as a new tensor of `dtype`."""
        shape = self.shapes[name]
        if experts is not None:
            shape = (len(experts), *shape[1:])
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out, experts)
        return out

    def _read_into(self, name: str, out: torch.Tensor, experts: range | None) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Unmaps the files read so far (the pages read stop counting toward this process's memory)."""

    def has_block(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.shapes)


def check_finite(tensor: torch.Tensor, name: str, where: Path) -> None:
    """CheckpointError naming `name` when `tensor` holds a NaN or an infinity (one pass, 16 MB at a time)."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[start:start + FINITE_CHUNK]).all():
            raise CheckpointError(f"{where}: {name} holds non-finite values (NaN or inf); these weights cannot be "
                                  "trained or served: use an earlier checkpoint or the original release")


def check_dtypes(dtypes: dict[str, torch.dtype], where: Path) -> None:
    """Floating tensors only, all in one dtype (the most common one), but for FP32_ALLOWED in fp32 and FP8 weights
    (whose scales the safetensors reader checks)."""
    for name, dtype in dtypes.items():
        if not dtype.is_floating_point:
            raise CheckpointError(f"{where}: {name} is {str(dtype).removeprefix('torch.')}; model weights are "
                                  "floating-point tensors: the file is not a model's weights or is damaged")
    main = [d for n, d in dtypes.items() if d != torch.float8_e4m3fn and not n.endswith(FP32_ALLOWED)]
    if not main:
        return
    common = Counter(main).most_common(1)[0][0]
    for name, dtype in dtypes.items():
        if dtype in (common, torch.float8_e4m3fn) or (dtype == torch.float32 and name.endswith(FP32_ALLOWED)):
            continue
        raise CheckpointError(f"{where}: {name} is {str(dtype).removeprefix('torch.')} while the other weights are "
                              f"{str(common).removeprefix('torch.')}; a model's weights are stored in one dtype (the "
                              "routers may be fp32, FP8 weights come with their scales): the file is damaged or mixed")


def model_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight and persistent buffer of the model with `config` and its full shape (routed experts stacked),
    from a model built on the meta device (no memory); a tied output head is the embedding, listed once."""
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config, seed=None)
    shapes, seen = {}, set()
    for module_name, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False)
                     if n not in module._non_persistent_buffers_set)]
        for name, tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                shapes[f"{module_name}.{name}" if module_name else name] = tuple(tensor.shape)
    return shapes


def check_weights(source: WeightSource, config: ModelConfig) -> bool:
    """Refuses (one CheckpointError line) weights whose dtypes, key set or shapes do not fit `config`, from the
    headers alone; returns whether they hold the MTP block (a block absent as a whole is allowed: it starts fresh;
    so are the balancing biases of softmax routing, which deepseek_v2 has not)."""
    check_dtypes(source.dtypes, source.path)
    expected = model_shapes(config)
    prefix = mtp_prefix(config)
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    has_mtp = config.num_nextn_predict_layers > 0 and source.has_block(prefix)
    allowed_missing = [name for name in missing if (not has_mtp and name.startswith(prefix))
                       or (config.scoring_func == "softmax" and name.endswith(NO_BIAS_IN_V2))]
    if unexpected or len(missing) > len(allowed_missing):
        missing = [name for name in missing if name not in allowed_missing]
        raise CheckpointError(f"{source.path}: weights do not match the model config (missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                              f"{' ...' if len(unexpected) > 3 else ''})")
    for name, shape in expected.items():
        if name in source.shapes and tuple(source.shapes[name]) != shape:
            raise CheckpointError(f"{source.path}: {name} is {list(source.shapes[name])} there but {list(shape)} in "
                                  "the model config; the weights belong to another model (or the file is damaged)")
    return has_mtp


def _experts_of(value: torch.Tensor, name: str, experts: range | None, stats: ReadStats) -> torch.Tensor:
    """The rows `experts` of a stacked routed-expert tensor (all of it otherwise), counted as read."""
    part = value if experts is None else value[experts.start:experts.stop]
    stats.add(part, is_routed_expert_param(name))
    return part


# ---------------------------------------------------------------------- training checkpoints
class DeepSpeedWeights(WeightSource):
    """A DeepSpeed checkpoint tag: ZeRO-1/2 module weights (memory-mapped; under expert parallelism one file per
    global expert, of which only the asked experts' are opened), or ZeRO-3's fp32 masters reassembled from the
    ranks' partitions one parameter or one expert at a time (`gpt_moe.checkpoint.zero_files`)."""

    def __init__(self, tag_dir: Path, record: CheckpointRecord, config: ModelConfig) -> None:
        super().__init__(tag_dir)
        self.record, self.n_experts = record, config.n_routed_experts
        require_files(tag_dir, record)  # a checkpoint of node-local disks: gathered first
        self.zero = ZeroCheckpoint(tag_dir) if record.layout.zero_stage == 3 else None
        self._module: dict[str, torch.Tensor] | None = None
        self.expert_files: dict[tuple[str, int], Path] = {}
        if self.zero is not None:
            self._index_zero3()
        else:
            self._index_zero12()

    def _module_states(self) -> dict[str, torch.Tensor]:
        if self._module is None:
            self._module = load_data_only(self.path / "mp_rank_00_model_states.pt", mmap=True)["module"]
        return self._module

    def _index_zero12(self) -> None:
        for name, value in self._module_states().items():
            self.shapes[name], self.dtypes[name] = tuple(value.shape), value.dtype
        by_layer: dict[int, dict[int, Path]] = {}
        for file in self.path.iterdir():
            if match := EXPERT_FILE.search(file.name):
                by_layer.setdefault(int(match[1]), {})[int(match[2])] = file
        for layer, files in sorted(by_layer.items()):
            if sorted(files) != list(range(self.n_experts)):
                raise CheckpointError(f"{self.path}: experts of MoE layer {layer} are incomplete ({len(files)} files "
                                      f"of {self.n_experts})")
            for key, value in load_data_only(files[0], mmap=True).items():  # one file tells the names and shapes
                parsed = parse_expert_key(key)
                if parsed is None:
                    raise CheckpointError(f"{files[0]}: unexpected key {key!r} in an expert file")
                name = f"{parsed[0]}.{parsed[2]}"
                self.shapes[name], self.dtypes[name] = (self.n_experts, *value.shape), value.dtype
                self.expert_files.update({(name, e): file for e, file in files.items()})
        self.release()

    def _index_zero3(self) -> None:
        if any(len(p.holders) > 1 for p in self.zero.parameters.values()) and not self.zero.record.expert_ranges:
            raise CheckpointError(f"{self.path}: expert partitions but no expert_ranges in COMPLETE (saved by an "
                                  "older gpt-moe); load it with that version")
        module = self.zero.model_states["module"]
        for name in self.zero.model_states["buffer_names"]:
            if name in module:
                self.shapes[name], self.dtypes[name] = tuple(module[name].shape), module[name].dtype
        for name, param in self.zero.parameters.items():
            expert = len(param.holders) > 1 or is_routed_expert_param(name)
            self.shapes[name] = (self.n_experts, *param.shape[1:]) if expert else tuple(param.shape)
            self.dtypes[name] = torch.float32  # the fp32 master weights

    def _read_into(self, name: str, out: torch.Tensor, experts: range | None) -> None:
        if self.zero is not None and name in self.zero.parameters:
            param = self.zero.parameters[name]
            if is_routed_expert_param(name):
                for j, e in enumerate(experts or range(self.n_experts)):
                    out[j].copy_(self.zero.read_expert(param, e, "fp32"))
                    self.stats.add(out[j], True)
            else:
                out.copy_(self.zero.read(param, "fp32"))
                self.stats.add(out, False)
        elif self.zero is not None:  # a buffer
            out.copy_(self.zero.model_states["module"][name])
        elif (name, 0) in self.expert_files:
            for j, e in enumerate(experts or range(self.n_experts)):
                value = load_data_only(self.expert_files[name, e], mmap=True)
                key = next(k for k in value if parse_expert_key(k)[2] == name.rsplit(".", 1)[1])
                out[j].copy_(value[key])
                self.stats.add(out[j], True)
        else:
            out.copy_(_experts_of(self._module_states()[name], name, experts, self.stats))

    def release(self) -> None:
        self._module = None
        if self.zero is not None:
            self.zero.release()
