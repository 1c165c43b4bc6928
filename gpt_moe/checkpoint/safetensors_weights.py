"""The safetensors of a gpt-moe export or a transformers DeepSeek directory, read under our names one tensor (or
one expert) at a time from memory-mapped files (`safetensors.safe_open`, `get_slice`).

What the files may call a tensor, and what we make of it:

    model.layers.L.mlp.experts.gate_up_proj / .down_proj    stacked routed experts (our exports, transformers 5
                                                            in memory): a rank reads only its experts' rows
    model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight one tensor per expert (the releases, and what
                                                            transformers' save_pretrained writes): a rank opens
                                                            only its experts'; gate and up are stacked into
                                                            gate_up_proj [E, 2I, H] (gate rows first)
    NAME + NAME_scale_inv                                   FP8 e4m3 with block scales (DeepSeek-V3's release):
                                                            dequantised block row by block row (`fp8`)
    model.layers.N.embed_tokens.weight,                     the MTP layer's own copies of the embedding and the
    model.layers.N.shared_head.head.weight                  output head (N = num_hidden_layers, DeepSeek-V3's
                                                            layout): our MTP block shares the model's, so they
                                                            must be equal to them (checked as they are read)
    lm_head.weight with tie_word_embeddings                 the embedding again (checked equal)

Every file's header is read when the source is opened (a damaged header is one CheckpointError naming the file);
no tensor data is read until asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt_moe.checkpoint import fp8
from gpt_moe.checkpoint.model_dir import MTP_FILE
from gpt_moe.checkpoint.weights import WeightSource
from gpt_moe.errors import CheckpointError, first_line
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import mtp_prefix

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
PER_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SCALE_SUFFIX = "_scale_inv"
ROWS_AT_ONCE = 1 << 24  # elements copied per step when converting a plain tensor (64 MB of fp32)


@dataclass(frozen=True)
class Stored:
    """One tensor in one file, as its header describes it."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Entry:
    """How one of our tensors is read: `parts[e]` the stored tensors of expert e, stacked along dim 1 (gate and up:
    two parts each; one part otherwise), or one stored tensor (`parts[0]`, `stacked`: rows are experts);
    `copies`: stored tensors that must equal this one."""

    parts: list[list[Stored]]
    per_expert: bool = False
    expert: bool = False
    copies: list[Stored] = field(default_factory=list)


def _open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # noqa: BLE001 - safetensors' own error type for every damage
        raise CheckpointError(f"{file}: cannot load this checkpoint: not a readable safetensors file "
                              f"({first_line(err)}); the file is damaged or truncated") from None


class SafetensorsWeights(WeightSource):
    """model*.safetensors (+ our mtp.safetensors) of an export or a transformers directory. `fp8_block`: the
    [rows, columns] of a scale block (config.json's quantization_config), None when the weights are not FP8."""

    def __init__(self, directory: Path, config: ModelConfig, fp8_block: tuple[int, int] | None = None) -> None:
        super().__init__(directory)
        self.fp8_block, self._handles = fp8_block, {}
        files = sorted(self.path.glob("model*.safetensors")) + sorted(self.path.glob(MTP_FILE))
        if not files:
            raise CheckpointError(f"{self.path}: no model*.safetensors files")
        stored: dict[str, Stored] = {}
        for file in files:
            handle = _open(file)
            for key in handle.keys():
                if key in stored:
                    raise CheckpointError(f"{file}: {key} is also in {stored[key].file.name}")
                piece = handle.get_slice(key)
                dtype = DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: {key} has dtype {piece.get_dtype()}, not a weight's")
                stored[key] = Stored(file, key, dtype, tuple(piece.get_shape()))
            handle.__exit__(None, None, None)
        self.scales = self._scales(stored)
        self.entries = self._entries(stored, config)

    def _scales(self, stored: dict[str, Stored]) -> dict[str, Stored]:
        """The FP8 weights' scales by weight key; refuses an FP8 weight without one, or a scale without a weight."""
        scales = {key.removesuffix(SCALE_SUFFIX): stored.pop(key) for key in list(stored) if key.endswith(SCALE_SUFFIX)}
        for key, scale in scales.items():
            weight = stored.get(key)
            if weight is None or weight.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{scale.file}: {scale.key} scales no float8_e4m3fn weight {key}")
            if self.fp8_block is None:
                raise CheckpointError(f"{scale.file}: {key} is FP8 but config.json has no quantization_config "
                                      "(quant_method fp8, weight_block_size)")
            if len(weight.shape) != 2 or scale.shape != fp8.scale_shape(weight.shape, self.fp8_block) \
                    or not scale.dtype.is_floating_point:
                raise CheckpointError(f"{scale.file}: {scale.key} is {list(scale.shape)} {scale.dtype}; for "
                                      f"{list(weight.shape)} in blocks of {list(self.fp8_block)} it must be "
                                      f"{list(fp8.scale_shape(weight.shape, self.fp8_block))} floating-point")
        for item in stored.values():
            if item.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and item.key not in scales:
                raise CheckpointError(f"{item.file}: {item.key} is {item.dtype} without {item.key}{SCALE_SUFFIX}; "
                                      "gpt-moe reads FP8 weights with block scales (DeepSeek-V3's format) only")
        return scales

    def _entries(self, stored: dict[str, Stored], config: ModelConfig) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        experts: dict[tuple[str, str], dict[int, Stored]] = {}
        copies = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
        if config.num_nextn_predict_layers:
            head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            copies.update({f"{mtp_prefix(config)}embed_tokens.weight": "model.embed_tokens.weight",
                           f"{mtp_prefix(config)}shared_head.head.weight": head})
        for key, item in stored.items():
            if match := PER_EXPERT.match(key):
                experts.setdefault((match[1], match[3]), {})[int(match[2])] = item
            elif key not in copies:
                entries[key] = Entry([[item]], expert=key.endswith((".experts.gate_up_proj", ".experts.down_proj")))
        for (prefix, proj), by_id in experts.items():
            if sorted(by_id) != list(range(config.n_routed_experts)):
                raise CheckpointError(f"{self.path}: {prefix}.*.{proj} holds experts {sorted(by_id)[:4]}..., "
                                      f"expected each of the {config.n_routed_experts} routed experts once")
        for prefix in sorted({prefix for prefix, _ in experts}):
            for name, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                if all((prefix, p) in experts for p in projs):
                    entries[f"{prefix}.{name}"] = Entry([[experts[prefix, p][e] for p in projs]
                                                         for e in range(config.n_routed_experts)],
                                                        per_expert=True, expert=True)
        for key, target in copies.items():
            if key in stored and target in entries:
                entries[target].copies.append(stored[key])
            elif key in stored:
                entries[key] = Entry([[stored[key]]])  # nothing to be a copy of: reported as unexpected
        for name, entry in entries.items():
            self.shapes[name], self.dtypes[name] = self._describe(name, entry)
        return entries

    def _describe(self, name: str, entry: Entry) -> tuple[tuple[int, ...], torch.dtype]:
        """Our full shape of an entry and its stored dtype (every part of a per-expert weight alike)."""
        first = entry.parts[0]
        for parts in entry.parts:
            for part, reference in zip(parts, first):
                if (part.shape, part.dtype) != (reference.shape, reference.dtype):
                    raise CheckpointError(f"{part.file}: {part.key} is {list(part.shape)} {part.dtype} but "
                                          f"{reference.key} is {list(reference.shape)} {reference.dtype}")
        for copy in entry.copies:
            if copy.shape != first[0].shape:
                raise CheckpointError(f"{copy.file}: {copy.key} is {list(copy.shape)}, but it is a copy of {name} "
                                      f"{list(first[0].shape)}")
        if not entry.per_expert:
            return first[0].shape, first[0].dtype
        rows = sum(part.shape[0] for part in first)
        return (len(entry.parts), rows, *first[0].shape[1:]), first[0].dtype

    # ------------------------------------------------------------------ reading
    def _slice(self, item: Stored):
        if item.file not in self._handles:
            self._handles[item.file] = _open(item.file)
        return self._handles[item.file].get_slice(item.key)

    def _read_into(self, name: str, out: torch.Tensor, experts: range | None) -> None:
        entry = self.entries[name]
        if entry.per_expert:
            for j, e in enumerate(experts or range(len(entry.parts))):
                row = 0
                for part in entry.parts[e]:
                    self._read_stored(part, out[j, row:row + part.shape[0]], None, True)
                    row += part.shape[0]
        else:
            self._read_stored(entry.parts[0][0], out, experts, entry.expert)
        for copy in entry.copies:
            self._check_copy(copy, out, name)

    def _read_stored(self, item: Stored, out: torch.Tensor, experts: range | None, expert: bool) -> None:
        """One stored tensor (rows `experts` of a stacked one) into `out`, a block of rows at a time."""
        piece = self._slice(item)
        if item.key in self.scales:
            scale = self._slice(self.scales[item.key])[:]
            self.stats.add(scale, expert)

            def rows(start: int, end: int) -> torch.Tensor:
                block = piece[start:end]
                self.stats.add(block, expert)
                return block

            fp8.dequantize(rows, scale, out, self.fp8_block)
            return
        first = experts.start if experts is not None else 0
        count = out.shape[0] if out.dim() else 0
        if count == 0:
            block = piece[:]
            out.copy_(block)
            self.stats.add(block, expert)
            return
        step = max(1, ROWS_AT_ONCE // max(1, out[0].numel()))
        for start in range(0, count, step):
            block = piece[first + start:first + min(start + step, count)]
            out[start:start + block.shape[0]].copy_(block)
            self.stats.add(block, expert)

    def _check_copy(self, copy: Stored, out: torch.Tensor, name: str) -> None:
        """A stored copy of tensor `name` (an MTP layer's embedding or head, a tied head) equals what was read."""
        piece = self._slice(copy)
        step = max(1, ROWS_AT_ONCE // max(1, out[0].numel()))
        for start in range(0, out.shape[0], step):
            block = piece[start:start + step]
            self.stats.add(block, False)
            if not torch.equal(block.to(out.dtype), out[start:start + block.shape[0]]):
                raise CheckpointError(f"{copy.file}: {copy.key} differs from {name}; gpt-moe's MTP block shares the "
                                      "model's embedding and output head, so their copies must be equal")

    def release(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
