"""Plan a training run before anything heavy starts: resolved configs, layout, run directory, resume, memory.

`plan_run` reads the model, training and DeepSpeed configs, checks everything a user can get wrong
(ConfigError / DataError / CheckpointError naming the file, key or flag) and returns a `RunPlan` holding the
values the run will use: the training config with what the DeepSpeed JSON fixed (batch sizes, lr, clipping),
the DeepSpeed config with every "auto" resolved, the layout (ranks, EP size, ZeRO stage, precision), the run
directory, what `--resume` will continue from and whether that converts between layouts (`ResumePlan`), the
weights `--init-from` starts from, and a memory estimate. It starts nothing: `--dry-run` prints
`RunPlan.banner()` and exits; the trainer is built from the plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.checkpoint.loading import open_weights
from gpt_moe.checkpoint.model_dir import ModelDirectory, locate
from gpt_moe.checkpoint.records import RUN_CONFIG_FILE, RUNS_DIR, CheckpointRecord, Layout, newest_complete, read_record
from gpt_moe.checkpoint.weights import check_weights
from gpt_moe.data.manifest import DEFAULT_CHAT_DATA_DIR, DEFAULT_DATA_DIR, MANIFEST_FILE, Manifest
from gpt_moe.data.mixed_batches import text_rows
from gpt_moe.errors import CheckpointError, ConfigError, DataError, GptMoeError
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.params import account, describe
from gpt_moe.model.recompute import MODES
from gpt_moe.train.config import TrainConfig
from gpt_moe.train.ds_config import (TrainingShape, load_ds_config, resolve_ds_config, validate_with_deepspeed,
                                     zero_stage)
from gpt_moe.train.dtype_choice import choose_bf16_on_cpu
from gpt_moe.train.hardware import Hardware, cpu_bf16_limit
from gpt_moe.train.memory_plan import GIB, MemoryLayout, largest_micro_batch, training_memory


@dataclass(frozen=True)
class ResumePlan:
    """What the run continues from: a complete checkpoint tag (or a layout-free checkpoint) and its record.
    `convert`: its layout differs from the run's (or it is layout-free), so `gpt_moe.checkpoint.reshard` puts its
    state into the new engine parameter by parameter; otherwise DeepSpeed's own loader reads it."""

    tag: Path
    record: CheckpointRecord
    convert: bool
    batch_note: str | None = None  # the global batch differs from the checkpoint's: what changed, or was kept

    def describe(self, layout: Layout) -> str:
        what = f"{self.tag} (step {self.record.step}, {self.record.tokens_seen:,} tokens)"
        how = ("the same layout, DeepSpeed's loader" if not self.convert
               else f"converting from {self.record.layout.describe()} to {layout.describe()}")
        return f"resume from {what}: {how}" + (f"\nresume: {self.batch_note}" if self.batch_note else "")


@dataclass(frozen=True)
class RunPlan:
    train: TrainConfig  # with the values the DeepSpeed JSON fixed
    model: ModelConfig  # with the training config's overrides
    ds_config: dict[str, Any]  # every "auto" resolved
    world_size: int
    zero_stage: int
    run_dir: Path
    prepare_default_data: bool  # the default data directory is not prepared yet
    init_from: ModelDirectory | None = None  # --init-from: the weights to start from
    device_type: str = "cuda"  # DeepSpeed's accelerator
    resume: ResumePlan | None = None  # None: the run starts at step 0
    precision: str = ""  # why the run trains in bf16 or fp32 (the banner says it)
    mix_off: str = "off"  # why no pretraining text is mixed in, when none is
    ranks_per_node: int = 0  # ranks on this rank's node, as the launcher said (`launcher_ranks_per_node`); 0: all
    disks: str = ""  # shared or node-local, found at start (`gpt_moe.train.disks`); "" before

    @property
    def nodes(self) -> str:
        """The run's nodes x ranks per node, in words: the world divided by the ranks on this rank's node (every
        node holds as many ranks in the launch forms this trainer documents; a world that does not divide is
        said as it is)."""
        per_node = self.ranks_per_node or self.world_size
        if self.world_size % per_node:
            return f"{self.world_size} rank(s), {per_node} on this node (nodes of unequal size)"
        return f"{self.world_size // per_node} node(s) x {per_node} rank(s) per node"

    @property
    def mixing(self) -> str:
        """What the fine-tuning rows hold besides conversations (`--mix-pretrain`), in words."""
        t = self.train
        if not t.mix_pretrain:
            return self.mix_off
        return (f"{text_rows(t.mix_pretrain, t.micro_batch)} of every {t.micro_batch} rows from {t.mix_data} "
                f"(--mix-pretrain {t.mix_pretrain}), every token trained")

    @property
    def bf16(self) -> bool:
        return bool(self.ds_config["bf16"]["enabled"])

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.train.ep_size, self.zero_stage, self.bf16)

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

    @property
    def eval_suite(self) -> bool:
        """Whether evaluations run the whole suite (`--eval-suite`): "auto" turns it on for a run that reaches at
        least one --eval-interval, so a short run (a smoke test, whose only evaluation is the final one) does not
        pay for it."""
        return self.train.eval_suite == "on" or (self.train.eval_suite == "auto"
                                                 and self.last_step >= self.train.eval_interval)

    def memory_layout(self, **changes: Any) -> MemoryLayout:
        """The run's layout for `gpt_moe.train.memory_plan` (fields in `changes` replaced)."""
        t, zero = self.train, self.ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        layout = MemoryLayout(self.layout, t.seq_len, t.micro_batch, t.activation_checkpointing, offload,
                              self.device_type, int(zero.get("sub_group_size", 10 ** 12)))
        return layout.changed(**changes)

    def memory_lines(self) -> list[str]:
        """The banner's memory estimate: the run's parts, activations per checkpointing mode, and with
        --memory-per-rank the largest micro-batch that fits per mode (or what to change)."""
        estimate = training_memory(self.model, self.memory_layout())
        by_mode = {mode: training_memory(self.model, self.memory_layout(checkpointing=mode)).parts["activations"]
                   for mode in MODES}
        lines = [f"memory per rank (estimate, GiB): total {estimate.total_gib:.3f} = "
                 + ", ".join(f"{k} {v:.3f}" for k, v in estimate.parts.items())
                 + "".join(f"; host {k} {v:.3f}" for k, v in estimate.host.items()),
                 "  activations by --activation-checkpointing: "
                 + ", ".join(f"{mode} {value:.3f}" for mode, value in by_mode.items())]
        if self.train.memory_per_rank:
            lines += fit_lines(self, parse_memory(self.train.memory_per_rank))
        return lines

    def banner(self) -> str:
        """What the run will do, printed at start (and by --dry-run)."""
        model, t = self.model, self.train
        return "\n".join([
            "=" * 72,
            f"gpt-moe training  run dir {self.run_dir}",
            f"world {self.world_size} rank(s), expert-parallel size {t.ep_size} "
            f"({model.n_routed_experts // t.ep_size} routed experts per rank per layer), "
            f"ZeRO stage {self.zero_stage}, bf16 {self.ds_config['bf16']['enabled']}",
            f"nodes: {self.nodes}",
            f"disks: {self.disks or 'found at start: shared, or node-local (docs/training.md, Many nodes)'}",
            f"precision: {self.precision}",
            "compile: " + ("each decoder layer and the MTP block (torch.compile); the first step includes compiling"
                           if t.compile else "off (eager; --compile compiles each decoder layer)"),
            describe(account(model, t.seq_len)),
            *([f"pretraining text mixed in (--mix-pretrain): {self.mixing}"] if self.init_from else []),
            self.resume.describe(self.layout) if self.resume else "resume: nothing to resume, the run starts at step 0",
            f"evaluation: every {t.eval_interval} steps and at step {self.last_step}; HumanEval and the parent's "
            f"figures {'on' if self.eval_suite else 'off'} (--eval-suite {t.eval_suite})",
            *self.memory_lines(),
            "model config: " + json.dumps({k: v for k, v in model.to_dict().items() if k != "extra"}),
            "training config: " + json.dumps(dataclasses.asdict(t)),
            "DeepSpeed config (resolved): " + json.dumps(self.ds_config),
            "=" * 72,
        ])


def launcher_ranks_per_node(environ: Mapping[str, str] = os.environ) -> int:
    """The ranks on this process's node, from the environment its launcher set: LOCAL_WORLD_SIZE (torchrun) or
    LOCAL_SIZE (the deepspeed launcher, with or without ssh, which sets no LOCAL_WORLD_SIZE); 0 where neither is
    set (plain `python`, a dry run): the banner then counts the whole world as one node. Both launchers count the
    ranks they start on their own node, so this holds on every node; the node count is the world divided by it."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def plan_run(cfg: TrainConfig, explicit: frozenset[str], world_size: int, hardware: Hardware,
             ranks_per_node: int = 0) -> RunPlan:
    """The run `cfg` describes on `world_size` ranks of `hardware`, `ranks_per_node` of them on each node (0: one
    node); `explicit` names the flags given on the command line (a DeepSpeed JSON value that contradicts one of
    them is an error)."""
    plan = dataclasses.replace(_plan(cfg, explicit, world_size, hardware), ranks_per_node=ranks_per_node)
    resume = plan_resume(cfg.resume, plan.checkpoint_dir, plan.layout)
    if resume is None:
        return plan
    plan, resume = keep_global_batch(plan, resume, cfg, explicit, hardware)
    return dataclasses.replace(keep_mix(plan, resume, explicit), resume=resume)


def keep_mix(plan: RunPlan, resume: ResumePlan, explicit: frozenset[str]) -> RunPlan:
    """A resumed fine-tuning run that would mix by default keeps the pretraining text mix it trained with (its run
    directory's train_config.json; a run from before --mix-pretrain had none) unless --mix-pretrain is given."""
    if plan.init_from is None or "--mix-pretrain" in explicit or not plan.train.mix_pretrain:
        return plan
    try:
        config = json.loads((resume.tag.parent.parent / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        fraction, data = float(config.get("mix_pretrain", 0.0)), str(config.get("mix_data", ""))
    except (OSError, ValueError, TypeError, AttributeError):
        return plan
    if fraction == plan.train.mix_pretrain and (not fraction or data == plan.train.mix_data):
        return plan
    train = dataclasses.replace(plan.train, mix_pretrain=fraction, mix_data=data if fraction else "")
    return dataclasses.replace(plan, train=train, mix_off="off, as the run being resumed trained")


def _plan(cfg: TrainConfig, explicit: frozenset[str], world_size: int, hardware: Hardware) -> RunPlan:
    """`plan_run` without the resume decision."""
    base = ModelDirectory.open(cfg.init_from) if cfg.init_from else None
    if base is not None:
        cfg = fine_tuning_defaults(cfg, explicit)
    if base is not None and "--model" in explicit:
        raise ConfigError(f"--model {cfg.model} with --init-from {cfg.init_from}: the model is the one of the weights; "
                          "drop --model")
    model = resolve_model_config(cfg, base.config if base else None)
    if base is not None:
        check_weights(open_weights(base), model)  # key set, shapes and dtypes from the headers, before anything starts
    raw_ds = load_ds_config(cfg.deepspeed_config)
    check_layout(cfg, model, world_size)
    if cfg.seq_len > model.max_position_embeddings:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the context of model {model.name!r} "
                          f"(max_position_embeddings={model.max_position_embeddings}); lower --seq-len, or use a "
                          "model config with a longer context (YaRN rope_scaling and a larger max_position_embeddings)")
    prepare_default_data = check_data(cfg)
    if not prepare_default_data:
        check_fine_tuning_data(cfg, base)
    cfg, mix_off = plan_mix(cfg, base, explicit)
    shape = TrainingShape(cfg.micro_batch, cfg.grad_accum, world_size, cfg.lr, cfg.weight_decay, cfg.clip,
                          hardware.bf16_supported, model.hidden_size, explicit, bf16_native=hardware.bf16_native,
                          device_type=hardware.device_type)
    ds_config, shape, precision = resolve_precision(raw_ds, shape, model, cfg)
    validate_with_deepspeed(ds_config, cfg.deepspeed_config)
    train = dataclasses.replace(cfg, micro_batch=shape.micro_batch, grad_accum=shape.grad_accum, clip=shape.clip,
                                lr=shape.lr, weight_decay=shape.weight_decay)
    if train.mix_pretrain and train.micro_batch == 1 and "--mix-pretrain" not in explicit:
        train, mix_off = dataclasses.replace(train, mix_pretrain=0.0), "off (a micro-batch of 1 row holds no mix)"
    text_rows(train.mix_pretrain, train.micro_batch)  # an explicit mix in a micro-batch of 1 is refused here
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(RUNS_DIR) / (model.name + ("-sft" if base else ""))
    return RunPlan(train, model, ds_config, world_size, zero_stage(ds_config), run_dir, prepare_default_data, base,
                   hardware.device_type, precision=precision, mix_off=mix_off)


def resolve_precision(raw_ds: dict[str, Any], shape: TrainingShape, model: ModelConfig,
                      cfg: TrainConfig) -> tuple[dict[str, Any], TrainingShape, str]:
    """`resolve_ds_config` with bf16 "auto" decided by speed on a CPU with native bf16 (`dtype_choice`): the
    resolved config, the shape, and why the run trains in the precision it does."""
    ds_config, resolved = resolve_ds_config(raw_ds, shape, source=cfg.deepspeed_config)
    bf16 = bool(ds_config["bf16"]["enabled"])
    if raw_ds.get("bf16", {}).get("enabled", "auto") != "auto":
        return ds_config, resolved, f"{'bf16' if bf16 else 'fp32'}: bf16.enabled {bf16} in {cfg.deepspeed_config}"
    if shape.device_type != "cpu":
        why = "the device supports bf16" if bf16 else "the device does not support bf16"
        return ds_config, resolved, f"auto: {'bf16' if bf16 else 'fp32'}, {why}"
    if not bf16:
        return ds_config, resolved, f"auto: fp32, this CPU emulates bf16 ({cpu_bf16_limit()})"
    choice = choose_bf16_on_cpu(model, ds_config, cfg.seq_len, resolved.micro_batch)
    if not choice.bf16:
        ds_config, resolved = resolve_ds_config(raw_ds, dataclasses.replace(shape, bf16_native=False),
                                                source=cfg.deepspeed_config)
    return ds_config, resolved, choice.why


def keep_global_batch(plan: RunPlan, resume: ResumePlan, cfg: TrainConfig, explicit: frozenset[str],
                      hardware: Hardware) -> tuple[RunPlan, ResumePlan]:
    """A resume on another layout continues at the checkpoint's global batch (tokens per optimizer step): when
    --grad-accum was not given and an accumulation gives that batch at this micro-batch, the plan takes it; either
    way the resume says in one line what changed (`ResumePlan.batch_note`)."""
    record, t = resume.record, plan.train
    saved = record.tokens_seen // record.step if record.step else 0
    if not saved or saved == plan.tokens_per_step:
        return plan, resume
    per_step = t.seq_len * t.micro_batch * plan.world_size
    needed = saved // per_step if saved % per_step == 0 else None
    change = (f"the checkpoint trained at {saved:,} tokens per step, this layout at {t.micro_batch} x {t.seq_len} "
              f"tokens x {t.grad_accum} accumulation x {plan.world_size} rank(s) = {plan.tokens_per_step:,}")
    if needed and "--grad-accum" not in explicit:
        try:
            kept = dataclasses.replace(_plan(dataclasses.replace(cfg, grad_accum=needed), explicit,
                                             plan.world_size, hardware), ranks_per_node=plan.ranks_per_node)
        except ConfigError:  # the DeepSpeed JSON fixes the accumulation
            kept = None
        if kept is not None and kept.tokens_per_step == saved:
            return kept, dataclasses.replace(resume, batch_note=f"{change}; keeping the checkpoint's global batch "
                                                                f"with --grad-accum {needed}")
    keep = f"--grad-accum {needed} keeps it" if needed else "no --grad-accum keeps it at this --micro-batch"
    return plan, dataclasses.replace(resume, batch_note=f"{change}: the global batch changes; {keep}")


def plan_resume(resume: str, checkpoint_dir: Path, layout: Layout) -> ResumePlan | None:
    """`--resume auto` (the newest complete checkpoint of this run, if any), `none`, or a run or tag directory (a
    layout-free one included); refuses in one line what holds no training state."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = newest_complete(checkpoint_dir)
        if tag is None:
            return None
        kind = "checkpoint"
    else:
        tag, kind = locate(resume)
        if kind in ("export", "transformers"):
            what = "an export" if kind == "export" else "a transformers directory"
            raise CheckpointError(f"--resume {resume}: {what} holds weights only, no training state; start from its "
                                  "weights with --init-from")
    record = read_record(tag)
    return ResumePlan(tag, record, convert=kind == "layout-free" or not record.layout.matches(layout))


def parse_memory(text: str) -> float:
    """"80GB" (10^9 bytes), "24GiB" (2^30), "512MB", "512MiB" -> GiB."""
    units = {"gib": 1.0, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB, "tib": 1024.0, "tb": 1e12 / GIB}
    lowered = text.strip().lower()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        number = lowered[: -len(unit)].strip()
        if lowered.endswith(unit) and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return float(number) * factor
    raise ConfigError(f"--memory-per-rank {text!r}: expected a size such as 80GB, 24GiB or 512MiB")


def fit_lines(plan: RunPlan, budget_gib: float) -> list[str]:
    """The largest micro-batch under `budget_gib` per checkpointing mode; when even 1 does not fit, the layouts
    (ZeRO stage, EP size, optimizer offload) in which micro-batch 1 with full checkpointing would."""
    lines = [f"fits in {budget_gib:.2f} GiB per rank (largest micro-batch at seq {plan.train.seq_len}):"]
    for mode in MODES:
        best = largest_micro_batch(plan.model, plan.memory_layout(checkpointing=mode), budget_gib)
        lines.append(f"  {mode:9s} " + (f"micro-batch {best}" if best else "none"))
    if any(largest_micro_batch(plan.model, plan.memory_layout(checkpointing=m), budget_gib) for m in MODES):
        return lines
    options = []
    for stage, ep, offload in ((2, plan.train.ep_size, False), (3, plan.train.ep_size, False),
                               (3, plan.world_size, False), (3, plan.world_size, True)):
        if plan.model.n_routed_experts % ep:
            continue
        layout = plan.memory_layout(zero_stage=stage, ep_size=ep, offload=offload, checkpointing="full",
                                    micro_batch=1)
        if training_memory(plan.model, layout).total_gib <= budget_gib:
            options.append(f"ZeRO-{stage}, --ep-size {ep}" + (", optimizer offload" if offload else ""))
    lines.append("  nothing fits; change to: " + ("; ".join(options) if options else
                                                 f"more ranks (world {plan.world_size} is too small for this model)"))
    return lines


FINE_TUNING_DEFAULTS = {"data": DEFAULT_CHAT_DATA_DIR, "seq_len": 512, "micro_batch": 8, "lr": 1e-3,
                        "warmup_steps": 20, "mix_pretrain": 0.125}
"""What --init-from changes in the defaults: the built-in conversations, rows long enough to hold the longest of
them (323 tokens), a gentler learning rate than pretraining's, and an eighth of the rows pretraining text where the
base model's pretraining data is known (measured: docs/evaluation.md#forgetting)."""


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


def check_fine_tuning_data(cfg: TrainConfig, base: ModelDirectory | None) -> None:
    """Chat data needs --init-from (a model to fine-tune) whose tokenizer made the data."""
    manifest = Manifest.load(Path(cfg.data))
    if manifest.content == "chat" and base is None:
        raise ConfigError(f"{cfg.data}: chat data is for fine-tuning: add --init-from a pretrained run, checkpoint or "
                          "export (for example --init-from runs/tiny)")
    if base is not None and base.tokenizer is not None and base.tokenizer.sha256 != manifest.tokenizer.sha256:
        raise DataError(f"{cfg.data}: tokenized with {manifest.tokenizer.name} ({manifest.tokenizer.sha256[:12]}...), "
                        f"but {base.path} was trained with {base.tokenizer.name} ({base.tokenizer.sha256[:12]}...); "
                        f"prepare the data with --tokenizer-from {cfg.init_from}")


def pretraining_data_of(base: ModelDirectory) -> Path | None:
    """The prepared text data a training checkpoint's run trained on (its run directory's train_config.json), or
    None: an export or a transformers directory, a run whose config or data is gone, or a run on chat data."""
    if not base.is_checkpoint:
        return None
    try:
        config = json.loads((base.path.parent.parent / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
        data = Path(config["data"])
        manifest = Manifest.load(data)
    except (OSError, ValueError, KeyError, TypeError, GptMoeError):
        return None
    return data if manifest.content == "text" else None


def plan_mix(cfg: TrainConfig, base: ModelDirectory | None, explicit: frozenset[str]) -> tuple[TrainConfig, str]:
    """`cfg` with --mix-data resolved (or --mix-pretrain 0 where a default finds no text), and why no text is mixed
    in when none is. Given flags that cannot work are one error before anything starts: mixing without
    --init-from, no text known, text of another tokenizer."""
    asked = "--mix-pretrain" in explicit or "--mix-data" in explicit
    if cfg.mix_pretrain == 0:
        return cfg, "off"
    if base is None:
        raise ConfigError(f"--mix-pretrain {cfg.mix_pretrain}: mixing pretraining text is for fine-tuning; add "
                          "--init-from a pretrained run")
    if (Path(cfg.data) / MANIFEST_FILE).is_file() and Manifest.load(Path(cfg.data)).content == "text":
        if asked:
            raise ConfigError(f"--mix-pretrain {cfg.mix_pretrain}: {cfg.data} is text already; the mix is for "
                              "fine-tuning on conversations")
        return dataclasses.replace(cfg, mix_pretrain=0.0), f"off ({cfg.data} is text)"
    data = Path(cfg.mix_data) if cfg.mix_data else pretraining_data_of(base)
    if data is None:
        if asked:
            raise ConfigError(f"--mix-pretrain {cfg.mix_pretrain}: the pretraining data of {base.path} is not known "
                              "(not a training run, or its data is gone); give --mix-data DIR")
        return dataclasses.replace(cfg, mix_pretrain=0.0), (f"off (the pretraining data of {base.path} is not "
                                                            "known; --mix-data DIR --mix-pretrain F)")
    manifest = Manifest.load(data)
    if manifest.content != "text":
        raise DataError(f"{data}: --mix-data must be pretraining text, found {manifest.content!r} data")
    if base.tokenizer is not None and manifest.tokenizer.sha256 != base.tokenizer.sha256:
        raise DataError(f"{data}: --mix-data is tokenized with {manifest.tokenizer.name}, {base.path} was trained "
                        f"with {base.tokenizer.name}; give text prepared with --tokenizer-from {cfg.init_from}")
    return dataclasses.replace(cfg, mix_data=str(data)), "off"
