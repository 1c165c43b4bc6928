"""DeepSpeed JSON configs: load, reject typos, resolve "auto" values from the training arguments.

DeepSpeed silently ignores unknown top-level keys, so a typo such as "gradient_clip"
would train without clipping; we reject it. Values may be "auto": they are filled from
the command line and the hardware. A concrete JSON value that disagrees with an explicit
command-line flag is a conflict; all conflicts are reported in one error.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.config_file import read_json_object, reject_unknown_keys
from gpt_moe.errors import ConfigError, first_line

log = logging.getLogger(__name__)

# Top-level sections and keys DeepSpeed 0.17+ reads (runtime/config.py and its sub-configs).
KNOWN_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "flops_profiler", "activation_checkpointing", "tensorboard", "wandb", "csv_monitor", "comet", "monitor_config",
    "communication_data_type", "seq_parallel_communication_data_type", "elasticity", "aio", "autotuning",
    "compression_training", "data_efficiency", "curriculum_learning", "checkpoint", "data_types", "pipeline",
    "sparse_attention", "disable_allgather", "compile", "nebula", "weight_quantization", "hybrid_engine",
    "eigenvalue", "progressive_layer_drop", "quantize_training", "timers", "gradient_allreduce_op",
    "use_data_before_expert_parallelism", "dataloader_drop_last", "zero_quantized_weights",
    "zero_quantized_gradients", "graph_harvesting", "use_node_local_storage", "load_universal_checkpoint",
    "tensor_parallel", "expert_parallel", "fp8", "mics_shard_size", "mics_hierarchical_params_gather",
})


@dataclass(frozen=True)
class TrainingShape:
    """What the trainer decided that the DeepSpeed config must agree with."""

    micro_batch: int
    grad_accum: int
    data_parallel_size: int
    lr: float
    weight_decay: float
    clip: float
    bf16_supported: bool  # the device can run bf16 at all
    hidden_size: int
    explicit: frozenset[str] = frozenset()  # names of the flags given on the command line
    bf16_native: bool | None = None  # bf16 matmuls are fast here (`gpt_moe.train.hardware`); None: as bf16_supported
    device_type: str = "cuda"  # "cpu" when DeepSpeed runs on its CPU accelerator

    @property
    def bf16_auto(self) -> bool:
        """What "auto" means for bf16.enabled: on where the hardware computes in bf16 natively."""
        return self.bf16_supported if self.bf16_native is None else self.bf16_native

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel_size


def load_ds_config(path: str | Path) -> dict[str, Any]:
    data = read_json_object(path, "DeepSpeed config",
                            hint="use one from ds_configs/ (zero1.json, zero2.json, zero3.json, zero2_offload.json)")
    reject_unknown_keys(data, KNOWN_TOP_LEVEL_KEYS, str(path), label="top-level key",
                        hint="DeepSpeed would silently ignore it; check the spelling against the DeepSpeed config "
                             "reference")
    return data


def resolve_ds_config(raw: dict[str, Any], shape: TrainingShape, source: str = "DeepSpeed config",
                      ) -> tuple[dict[str, Any], TrainingShape]:
    """(a copy of `raw` with every "auto" filled in, `shape` with the values the JSON fixed); raises one
    ConfigError listing all conflicts.

    A concrete JSON value for a batch size / lr / clipping overrides the trainer's default, unless the
    matching flag was given explicitly and differs: that is a conflict. The returned shape holds what
    DeepSpeed will use, so the trainer uses the same values.
    """
    ds = copy.deepcopy(raw)
    conflicts: list[str] = []
    shape = dataclasses.replace(shape, **_settle_training_values(ds, shape, conflicts))
    batch = ds.get("train_batch_size", "auto")
    if batch == "auto":
        ds["train_batch_size"] = shape.global_batch
    elif batch != shape.global_batch:
        conflicts.append(f"train_batch_size={batch} but micro batch {shape.micro_batch} x accumulation "
                         f"{shape.grad_accum} x data-parallel ranks {shape.data_parallel_size} = {shape.global_batch}")
    _resolve_precision(ds, shape, conflicts, source)
    _resolve_cpu_adam(ds, shape)
    _resolve_zero1_overlap(ds, shape, source)
    zero = ds.get("zero_optimization", {})
    h = shape.hidden_size
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h), ("allgather_bucket_size", h * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = _auto_paths(ds)
    if leftover:
        conflicts.append(f"cannot resolve \"auto\" at {', '.join(leftover)}")
    if conflicts:
        raise ConfigError(f"{source}: " + "; ".join(conflicts))
    return ds, shape


# (JSON section, key, command-line flag, TrainingShape field, label in messages)
_TRAINING_VALUES = (
    ((), "train_micro_batch_size_per_gpu", "--micro-batch", "micro_batch", "train_micro_batch_size_per_gpu"),
    ((), "gradient_accumulation_steps", "--grad-accum", "grad_accum", "gradient_accumulation_steps"),
    ((), "gradient_clipping", "--clip", "clip", "gradient_clipping"),
    (("optimizer", "params"), "lr", "--lr", "lr", "optimizer.params.lr"),
    (("optimizer", "params"), "weight_decay", "--weight-decay", "weight_decay", "optimizer.params.weight_decay"),
)


def _settle_training_values(ds: dict[str, Any], shape: TrainingShape, conflicts: list[str]) -> dict[str, Any]:
    """Fills "auto" (or absent) values from `shape`; returns the shape fields the JSON sets otherwise."""
    fixed: dict[str, Any] = {}
    for path, key, flag, attr, label in _TRAINING_VALUES:
        if path and not isinstance(ds.get(path[0]), dict):
            continue  # no optimizer section: DeepSpeed's client optimizer path, nothing to settle
        section = ds
        for name in path:
            section = section.setdefault(name, {})
        value = section.get(key, "auto")
        if value == "auto":
            section[key] = getattr(shape, attr)
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            conflicts.append(f"{label}={value!r} is not a number or \"auto\"")
        elif flag in shape.explicit and value != getattr(shape, attr):
            conflicts.append(f"{label}={value} but {flag} {getattr(shape, attr)}")
        else:
            fixed[attr] = value
    return fixed


def _resolve_zero1_overlap(ds: dict[str, Any], shape: TrainingShape, source: str) -> None:
    """ZeRO-1 with `overlap_comm` and gradient accumulation over several ranks applies wrong gradients in
    DeepSpeed 0.19.8: measured on 2 CPU ranks, the first step's gradient norm came out 2.565 (2.602 with EP=2)
    where 1 rank, ZeRO-2, or ZeRO-1 without overlap or without accumulation all give 2.212, and training
    drifts from there. ZeRO-1 then runs without overlap (as DeepSpeed did before 0.13, PR #4887)."""
    zero = ds.get("zero_optimization", {})
    if (isinstance(zero, dict) and zero.get("stage") == 1 and zero.get("overlap_comm") is True
            and shape.grad_accum > 1 and shape.data_parallel_size > 1):
        zero["overlap_comm"] = False
        log.warning("%s: zero_optimization.overlap_comm turned off: under ZeRO-1 with gradient accumulation it "
                    "applies wrong gradients (DeepSpeed 0.19.8)", source)


def _resolve_cpu_adam(ds: dict[str, Any], shape: TrainingShape) -> None:
    """On CPU, Adam/AdamW run as torch's AdamW (`"torch_adam": true`) unless the JSON chooses.

    DeepSpeed's CPU Adam kernel keeps beta1^t and beta2^t as running products, multiplied once per step,
    while a resumed run starts them from pow(beta, t): the two differ in the last bit at some steps (t = 7
    with betas 0.9/0.95), so a run resumed there drifted from the uninterrupted one. torch's AdamW computes
    the bias correction from the step count every time, so resuming is bit-exact. Optimizer offload keeps
    DeepSpeed's CPU Adam (its requirement); GPUs keep FusedAdam, which also computes from the step."""
    optimizer = ds.get("optimizer")
    zero = ds.get("zero_optimization", {})
    offloaded = isinstance(zero, dict) and zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if (shape.device_type != "cpu" or offloaded or not isinstance(optimizer, dict)
            or str(optimizer.get("type", "")).lower() not in ("adam", "adamw")):
        return
    optimizer.setdefault("params", {}).setdefault("torch_adam", True)


def _resolve_precision(ds: dict[str, Any], shape: TrainingShape, conflicts: list[str], source: str) -> None:
    """bf16.enabled "auto" -> native bf16 of this hardware; fp16 "auto" -> off."""
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = shape.bf16_auto
    elif bf16["enabled"] and not shape.bf16_supported:
        conflicts.append("bf16.enabled=true but this device does not support bf16 (use \"auto\")")
    elif bf16["enabled"] and not shape.bf16_auto:
        log.warning("%s: bf16.enabled=true on a device without native bf16 matmuls: they are emulated and "
                    "much slower than fp32 (\"auto\" would pick fp32)", source)
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") == "auto":
        fp16["enabled"] = False  # bf16 is preferred; fp16 only when asked for
    if isinstance(fp16, dict) and fp16.get("enabled") and bf16.get("enabled"):
        conflicts.append("fp16.enabled and bf16.enabled are both true")


def validate_with_deepspeed(ds: dict[str, Any], source: str) -> None:
    """Checks a resolved config with DeepSpeed's own config classes, nested sections included (a typo such as
    zero_optimization.overlap_com is refused there with a pydantic traceback once the engine starts; here it
    is one ConfigError naming the key path). DeepSpeed checks the batch sizes against its own world size,
    which is 1 before distributed start: the probe's batch is this rank's share (ours is checked above)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = copy.deepcopy(ds)
    probe["train_batch_size"] = probe["train_micro_batch_size_per_gpu"] * probe["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except ValueError as err:  # pydantic's ValidationError is one
        errors = err.errors() if hasattr(err, "errors") else []
        if errors:
            first = errors[0]
            path = _locate(ds, tuple(str(part) for part in first["loc"]))
            raise ConfigError(f"{source}: {path}: {first['msg'].lower()} (got {first.get('input')!r}); check it "
                              "against the DeepSpeed config reference") from None
        raise ConfigError(f"{source}: DeepSpeed rejects this config: {first_line(err, 200)}") from None
    except (AssertionError, AttributeError, KeyError, TypeError) as err:
        raise ConfigError(f"{source}: DeepSpeed rejects this config: {first_line(err, 200)}") from None


def _locate(ds: dict[str, Any], loc: tuple[str, ...]) -> str:
    """The dotted path of `loc` (relative to one of DeepSpeed's section models) in the JSON: the first
    top-level section under which it exists, else `loc` itself."""
    for section, value in ds.items():
        node = value
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return ".".join((section, *loc))
    return ".".join(loc)


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
