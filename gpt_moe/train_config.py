"""Training configuration: defaults < optional JSON file (--config) < command-line flags.

`parse_train_args` returns a validated `TrainConfig` and the set of flags given explicitly
(the DeepSpeed config must agree with those; see `ds_config.resolve_ds_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.errors import ConfigError


@dataclass
class TrainConfig:
    model: str = "tiny"  # preset name or model JSON
    data: str = "data/builtin"  # prepared shard directory (prepared from `builtin` if missing)
    run_dir: str = ""  # default runs/<model name>
    deepspeed_config: str = "ds_configs/zero2.json"
    seq_len: int = 256
    micro_batch: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: final share of steps that decays
    weight_decay: float = 0.1
    clip: float = 1.0
    max_steps: int = 300
    max_tokens: int = 0  # stop after this many training tokens (0: no limit)
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path of a checkpoint tag directory
    seed: int = 1234
    ep_size: int = 1
    mtp_weight: float | None = None  # None: the model config's mtp_loss_weight
    bias_update_rate: float | None = None
    seq_aux_loss_coef: float | None = None
    log_interval: int = 10
    sample_tokens: int = 48  # generated at each eval and written to TensorBoard
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    dry_run: bool = False

    def validate(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"training config: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        for key in ("seq_len", "micro_batch", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "save_interval", "keep_last", "ep_size", "log_interval", "max_bad_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                fail(key, "a positive integer")
        for key in ("warmup_steps", "max_tokens", "sample_tokens"):
            if getattr(self, key) < 0:
                fail(key, "an integer >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "a number in [0, 1]")
        if self.schedule not in ("cosine", "wsd"):
            fail("schedule", "'cosine' or 'wsd'")
        if not 0 < self.decay_fraction <= 1:
            fail("decay_fraction", "a number in (0, 1]")
        if self.weight_decay < 0 or self.clip < 0:
            fail("weight_decay" if self.weight_decay < 0 else "clip", "a number >= 0")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier (of cfg.lr) after `step` optimizer steps: linear warmup, then cosine
    to min_lr_ratio, or warmup-stable-decay with a linear decay over the last decay_fraction."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


HELP = {
    "model": "model preset (tiny, small, medium, deepseek-v2-lite, deepseek-v3) or a model JSON file",
    "data": "prepared token-shard directory (python -m data_prep); the default is prepared from `builtin` if missing",
    "run_dir": "run directory for TensorBoard logs and checkpoints (default runs/<model name>)",
    "deepspeed_config": "DeepSpeed JSON (ds_configs/zero{1,2,3}.json, zero2_offload.json); \"auto\" values resolved",
    "seq_len": "tokens per training sequence",
    "micro_batch": "sequences per rank per forward",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "warmup_steps": "linear warmup steps",
    "schedule": "cosine or wsd (warmup-stable-decay)",
    "decay_fraction": "wsd: fraction of steps in the final decay",
    "weight_decay": "AdamW weight decay (not applied to 1-D parameters: norm weights)",
    "clip": "gradient clipping by global norm (0: off)",
    "max_steps": "optimizer steps to train",
    "max_tokens": "stop after this many training tokens (0: no limit)",
    "eval_interval": "optimizer steps between validations",
    "eval_batches": "validation micro-batches per rank per evaluation",
    "save_interval": "optimizer steps between checkpoints",
    "keep_last": "complete checkpoints to keep",
    "resume": "auto (newest complete checkpoint of the run), none, or a checkpoint directory",
    "seed": "seed for weights, data order and dropout-free sampling",
    "ep_size": "expert-parallel size: ranks that share one copy of the routed experts",
    "mtp_weight": "multi-token-prediction loss weight (default: the model config's)",
    "bias_update_rate": "aux-loss-free balancing bias step per optimizer step (default: the model config's)",
    "seq_aux_loss_coef": "sequence-wise balance loss coefficient (default: the model config's)",
    "log_interval": "optimizer steps between logged scalars",
    "sample_tokens": "tokens generated as a text sample at each evaluation",
    "max_bad_steps": "consecutive non-finite steps that stop the run",
    "dry_run": "resolve and print both configs, parameter counts and a memory estimate, then exit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepspeed launch/train.py",
        description="Train a DeepSeek-style MoE model with DeepSpeed. Precedence: defaults < --config JSON < flags.",
    )
    parser.add_argument("--config", help="training JSON file with any of the options below (keys use underscores)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        names = [flag, "--deepspeed"] if field.name == "deepspeed_config" else [flag]
        if field.type == "bool":
            parser.add_argument(*names, dest=field.name, action="store_true", default=None, help=HELP[field.name])
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" |")[0], str)
        suffix = "" if field.default in (None, "") else f" (default: {field.default})"
        parser.add_argument(*names, dest=field.name, type=kind, default=None, help=HELP[field.name] + suffix)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    # fault injection for the tests: NaN losses at these steps; SIGKILL rank 0 inside this step's save
    parser.add_argument("--inject-nan-at", default="", help=argparse.SUPPRESS)
    parser.add_argument("--inject-kill-during-save", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse_train_args(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str], argparse.Namespace]:
    """(config, names of flags given on the command line, raw namespace)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_train_json(args.config))
    explicit = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                if getattr(args, f.name) is not None}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name) is not None})
    config = TrainConfig(**values)
    config.validate()
    return config, frozenset(explicit), args


def load_train_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: training config file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")
    return data
