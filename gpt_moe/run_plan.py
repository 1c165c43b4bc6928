"""Plan a training run before anything heavy starts: resolved configs, layout, run directory, memory.

`plan_run` reads the model, training and DeepSpeed configs, checks everything a user can get wrong
(ConfigError / DataError naming the file, key or flag) and returns a `RunPlan` holding the values
the run will use: the training config with what the DeepSpeed JSON fixed (batch sizes, lr, clipping),
the DeepSpeed config with every "auto" resolved, the ZeRO stage, the run directory and a memory
estimate. It starts nothing: `--dry-run` prints `RunPlan.banner()` and exits; the trainer is built
from the plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.config import ModelConfig
from gpt_moe.data import DEFAULT_CHAT_DATA_DIR, DEFAULT_DATA_DIR, Manifest
from gpt_moe.ds_config import TrainingShape, load_ds_config, resolve_ds_config, validate_with_deepspeed, zero_stage
from gpt_moe.errors import ConfigError, DataError
from gpt_moe.loading import Pretrained, pretrained
from gpt_moe.params import account, describe, training_memory_gib
from gpt_moe.train_config import TrainConfig


@dataclass(frozen=True)
class Hardware:
    """What the accelerator can do, as far as the plan is concerned."""

    bf16_supported: bool  # runs bf16 at all
    bf16_native: bool  # computes bf16 natively (see gpt_moe.hardware.native_bf16)
    device_type: str = "cuda"  # DeepSpeed's accelerator: "cuda", "cpu", ...


@dataclass(frozen=True)
class RunPlan:
    train: TrainConfig  # with the values the DeepSpeed JSON fixed
    model: ModelConfig  # with the training config's overrides
    ds_config: dict[str, Any]  # every "auto" resolved
    world_size: int
    zero_stage: int
    run_dir: Path
    prepare_default_data: bool  # the default data directory is not prepared yet
    pretrained: Pretrained | None = None  # --init-from: the weights to start from

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config["bf16"]["enabled"])

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        t = self.train
        return t.seq_len * t.micro_batch * t.grad_accum * self.world_size

    @property
    def last_step(self) -> int:
        """The step the run ends at: --max-steps, or earlier when --max-tokens is reached."""
        if self.train.max_tokens:
            return min(self.train.max_steps, math.ceil(self.train.max_tokens / self.tokens_per_step))
        return self.train.max_steps

    def memory_gib(self) -> dict[str, float]:
        t = self.train
        return training_memory_gib(self.model, t.seq_len, t.micro_batch, t.ep_size, self.zero_stage, self.world_size)

    def banner(self) -> str:
        """What the run will do, printed at start (and by --dry-run)."""
        model, t = self.model, self.train
        return "\n".join([
            "=" * 72,
            f"gpt-moe training  run dir {self.run_dir}",
            f"world {self.world_size} rank(s), expert-parallel size {t.ep_size} "
            f"({model.n_routed_experts // t.ep_size} routed experts per rank per layer), "
            f"ZeRO stage {self.zero_stage}, bf16 {self.ds_config['bf16']['enabled']}",
            describe(account(model, t.seq_len)),
            "memory per rank (estimate, GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in self.memory_gib().items()),
            "model config: " + json.dumps({k: v for k, v in model.to_dict().items() if k != "extra"}),
            "training config: " + json.dumps(dataclasses.asdict(t)),
            "DeepSpeed config (resolved): " + json.dumps(self.ds_config),
            "=" * 72,
        ])


def plan_run(cfg: TrainConfig, explicit: frozenset[str], world_size: int, hardware: Hardware) -> RunPlan:
    """The run `cfg` describes on `world_size` ranks of `hardware`; `explicit` names the flags given on the
    command line (a DeepSpeed JSON value that contradicts one of them is an error)."""
    base = pretrained(cfg.init_from) if cfg.init_from else None
    if base is not None:
        cfg = fine_tuning_defaults(cfg, explicit)
    if base is not None and "--model" in explicit:
        raise ConfigError(f"--model {cfg.model} with --init-from {cfg.init_from}: the model is the one of the weights; "
                          "drop --model")
    model = resolve_model_config(cfg, base.config if base else None)
    raw_ds = load_ds_config(cfg.deepspeed_config)
    check_layout(cfg, model, world_size)
    if cfg.seq_len > model.max_position_embeddings:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the context of model {model.name!r} "
                          f"(max_position_embeddings={model.max_position_embeddings}); lower --seq-len, or use a "
                          "model config with a longer context (YaRN rope_scaling and a larger max_position_embeddings)")
    prepare_default_data = check_data(cfg)
    if not prepare_default_data:
        check_fine_tuning_data(cfg, base)
    shape = TrainingShape(cfg.micro_batch, cfg.grad_accum, world_size, cfg.lr, cfg.weight_decay, cfg.clip,
                          hardware.bf16_supported, model.hidden_size, explicit, bf16_native=hardware.bf16_native,
                          device_type=hardware.device_type)
    ds_config, shape = resolve_ds_config(raw_ds, shape, source=cfg.deepspeed_config)
    validate_with_deepspeed(ds_config, cfg.deepspeed_config)
    train = dataclasses.replace(cfg, micro_batch=shape.micro_batch, grad_accum=shape.grad_accum, clip=shape.clip,
                                lr=shape.lr, weight_decay=shape.weight_decay)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / (model.name + ("-sft" if base else ""))
    return RunPlan(train, model, ds_config, world_size, zero_stage(ds_config), run_dir, prepare_default_data, base)


FINE_TUNING_DEFAULTS = {"data": DEFAULT_CHAT_DATA_DIR, "seq_len": 512, "micro_batch": 8, "lr": 1e-3,
                        "warmup_steps": 20}
"""What --init-from changes in the defaults: the built-in conversations, rows long enough to hold the longest of
them (323 tokens), and a gentler learning rate than pretraining's."""


def fine_tuning_defaults(cfg: TrainConfig, explicit: frozenset[str]) -> TrainConfig:
    """`cfg` with FINE_TUNING_DEFAULTS for the options still at their pretraining default and not given as flags."""
    pretraining = TrainConfig()
    changes = {key: value for key, value in FINE_TUNING_DEFAULTS.items()
               if f"--{key.replace('_', '-')}" not in explicit and getattr(cfg, key) == getattr(pretraining, key)}
    return dataclasses.replace(cfg, **changes)


def resolve_model_config(cfg: TrainConfig, base: ModelConfig | None = None) -> ModelConfig:
    """The model preset or JSON (or `base`, the config of --init-from weights) with the training config's loss
    and balancing overrides."""
    model_config = base if base is not None else ModelConfig.load(cfg.model)
    overrides = {key: value for key, value in (("mtp_loss_weight", cfg.mtp_weight),
                                               ("bias_update_rate", cfg.bias_update_rate),
                                               ("seq_aux_loss_coef", cfg.seq_aux_loss_coef),
                                               ("router_z_loss_coef", cfg.router_z_loss_coef)) if value is not None}
    return model_config.replace(**overrides) if overrides else model_config


def check_layout(cfg: TrainConfig, model_config: ModelConfig, world_size: int) -> None:
    """Expert-parallel size must divide both the world and the number of routed experts."""
    if world_size % cfg.ep_size:
        raise ConfigError(f"--ep-size {cfg.ep_size} does not divide the world size {world_size}; "
                          f"use a divisor of {world_size}")
    if model_config.n_routed_experts % cfg.ep_size:
        raise ConfigError(f"--ep-size {cfg.ep_size} does not divide n_routed_experts="
                          f"{model_config.n_routed_experts} of model {model_config.name!r}")


def check_data(cfg: TrainConfig) -> bool:
    """True if the data must be prepared first (only the default directory is prepared automatically)."""
    if (Path(cfg.data) / "manifest.json").is_file():
        return False
    if Path(cfg.data) in (Path(DEFAULT_DATA_DIR), Path(DEFAULT_CHAT_DATA_DIR)):
        return True
    raise DataError(f"{cfg.data}: no prepared data (manifest.json missing); prepare it with "
                    f"`python -m data_prep --out {cfg.data} ...` or omit --data to use the built-in corpus")


def check_fine_tuning_data(cfg: TrainConfig, base: Pretrained | None) -> None:
    """Chat data needs --init-from (a model to fine-tune) whose tokenizer made the data."""
    manifest = Manifest.load(Path(cfg.data))
    if manifest.content == "chat" and base is None:
        raise ConfigError(f"{cfg.data}: chat data is for fine-tuning: add --init-from a pretrained run, checkpoint or "
                          "export (for example --init-from runs/tiny)")
    if base is not None and base.tokenizer is not None and base.tokenizer.sha256 != manifest.tokenizer.sha256:
        raise DataError(f"{cfg.data}: tokenized with {manifest.tokenizer.name} ({manifest.tokenizer.sha256[:12]}...), "
                        f"but {base.source} was trained with {base.tokenizer.name} ({base.tokenizer.sha256[:12]}...); "
                        f"prepare the data with --tokenizer-from {cfg.init_from}")
