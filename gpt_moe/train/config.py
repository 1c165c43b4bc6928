"""Training configuration: defaults < optional JSON file (--config) < command-line flags.

`parse_train_args` returns a validated `TrainConfig` and the set of flags given explicitly
(the DeepSpeed config must agree with those; see `ds_config.resolve_ds_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from gpt_moe.config_file import read_json_object, reject_unknown_keys
from gpt_moe.data.manifest import DEFAULT_DATA_DIR
from gpt_moe.data.verify import VERIFY_MODES
from gpt_moe.errors import ConfigError
from gpt_moe.model.recompute import MODES


EVAL_SUITE_MODES = ("auto", "on", "off")
DIST_TIMEOUT_S = 600.0  # DeepSpeed's own default (10 minutes, DEEPSPEED_TIMEOUT), stated rather than inherited
# Launchers that start every node together (pdsh over ssh, srun) bring all ranks to the join within seconds of each
# other: what differs is each node's start-up (python, torch and DeepSpeed imports). 20 s leaves room for that and
# still ends a run with a node missing within about 30 s of its launch (`gpt_moe.train.join`).
JOIN_TIMEOUT_S = 20.0


def option(default: Any, help: str) -> Any:
    """A TrainConfig field with its command-line help text beside it."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training option; each becomes a --flag (underscores as dashes) and a key of the --config JSON."""

    model: str = option("tiny", "model preset (tiny, small, medium, deepseek-v2-lite, deepseek-v3) or a model "
                                "JSON file")
    data: str = option(DEFAULT_DATA_DIR, "prepared token-shard directory (python -m data_prep); the default is "
                                         "prepared from `builtin` if missing")
    run_dir: str = option("", "run directory for TensorBoard logs and checkpoints (default runs/<model name>)")
    deepspeed_config: str = option("ds_configs/zero2.json", "DeepSpeed JSON (ds_configs/zero{1,2,3}.json, "
                                                            "zero2_offload.json); \"auto\" values resolved")
    seq_len: int = option(256, "tokens per training sequence")
    micro_batch: int = option(16, "sequences per rank per forward")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = option(30, "linear warmup steps")
    schedule: str = option("cosine", "cosine or wsd (warmup-stable-decay)")
    decay_fraction: float = option(0.2, "wsd: fraction of steps in the final decay")
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to 1-D parameters: norm weights)")
    clip: float = option(1.0, "gradient clipping by global norm (0: off)")
    max_steps: int = option(300, "optimizer steps to train")
    max_tokens: int = option(0, "stop after this many training tokens (0: no limit)")
    eval_interval: int = option(100, "optimizer steps between validations")
    eval_batches: int = option(8, "validation micro-batches per rank per evaluation")
    eval_suite: str = option("auto", "auto, on or off: each evaluation also scores the first 32 HumanEval problems "
                                     "(bits per byte), and an --init-from run evaluates its parent before step 1; "
                                     "auto: on when the run is at least --eval-interval steps long")
    save_interval: int = option(100, "optimizer steps between checkpoints")
    keep_last: int = option(3, "complete checkpoints to keep")
    resume: str = option("auto", "auto (newest complete checkpoint of the run), none, or a checkpoint directory")
    seed: int = option(1234, "seed for weights, data order and dropout-free sampling")
    ep_size: int = option(1, "expert-parallel size: ranks that share one copy of the routed experts")
    mtp_weight: float | None = option(None, "multi-token-prediction loss weight (default: the model config's)")
    bias_update_rate: float | None = option(None, "aux-loss-free balancing bias step per optimizer step "
                                                  "(default: the model config's)")
    seq_aux_loss_coef: float | None = option(None, "sequence-wise balance loss coefficient (default: the model "
                                                   "config's)")
    router_z_loss_coef: float | None = option(None, "router z-loss coefficient (ST-MoE; default: the model "
                                                    "config's, 0 = off)")
    log_interval: int = option(10, "optimizer steps between logged scalars")
    peak_flops: float = option(0.0, "peak FLOP/s of one GPU, or of one CPU host, in the training dtype, that MFU "
                                    "divides by (0: the GPU data-sheet table; on CPU measured once per machine "
                                    "and cached)")
    collapse_windows: int = option(3, "log windows in a row with more than half of a MoE layer's routed experts "
                                      "dead (no tokens) before the collapse warning")
    sample_tokens: int = option(48, "tokens generated as a text sample at each evaluation")
    max_bad_steps: int = option(5, "consecutive non-finite steps that stop the run")
    verify_data: str = option("first", "check the shards' sha256 against the manifest: first (hash what is new or "
                                       "changed since the last check), always, never")
    init_from: str = option("", "fine-tune: start from the weights of a training checkpoint (run or step directory), "
                                "an export or a transformers DeepseekV3 directory; fresh optimizer and schedule")
    freeze_router: bool = option(False, "fine-tuning: keep every router weight and balancing bias as they are")
    mix_pretrain: float = option(0.0, "fine-tuning: the fraction of each micro-batch's rows drawn from pretraining "
                                      "text (--mix-data), trained on every token and packed apart from the "
                                      "conversations, against forgetting (--init-from default: see "
                                      "gpt_moe/train/plan.py FINE_TUNING_DEFAULTS)")
    mix_data: str = option("", "fine-tuning with --mix-pretrain: the pretraining text to mix in (default: the data "
                               "the --init-from run trained on, from its run directory's train_config.json)")
    activation_checkpointing: str = option("none", "none, full (recompute each decoder layer in backward; MoE "
                                                   "routing replayed) or selective (recompute the SwiGLU "
                                                   "feed-forwards only); see gpt_moe/model/recompute.py")
    compile: bool = option(False, "regional torch.compile: each decoder layer and the MTP block compiled for "
                                  "training (inductor: C++ on CPU, Triton on CUDA); the first step also compiles")
    memory_per_rank: str = option("", "with --dry-run: memory of one rank (e.g. 80GB, 24GiB): print the largest "
                                      "micro-batch that fits per checkpointing mode, or what to change")
    dist_timeout: float = option(DIST_TIMEOUT_S, "seconds a collective (all-reduce, barrier ...) waits for the other "
                                                 "ranks before the run ends with an error: how long a frozen or "
                                                 "lost node can hold the others (the process group's timeout)")
    join_timeout: float = option(JOIN_TIMEOUT_S, "seconds each rank waits at the start for every other rank to join "
                                                 "before the run ends with an error naming the missing ranks and "
                                                 "their node (one whose launcher never started them: an unreachable "
                                                 "host). Enough where the launcher starts all nodes together (pdsh "
                                                 "over ssh, srun; torchrun's ranks always meet at once); where "
                                                 "nodes start independently, raise it to the gap between them")
    dry_run: bool = option(False, "resolve and print both configs, parameter counts and a memory estimate, then exit")

    def validate(self) -> None:
        def fail(key: str, expected: str) -> None:
            raise ConfigError(f"training config: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        for key in ("seq_len", "micro_batch", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                    "save_interval", "keep_last", "ep_size", "log_interval", "max_bad_steps", "collapse_windows"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                fail(key, "a positive integer")
        for key in ("warmup_steps", "max_tokens", "sample_tokens"):
            if getattr(self, key) < 0:
                fail(key, "an integer >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", "a positive number")
        for key in ("dist_timeout", "join_timeout"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                fail(key, "a positive number of seconds")
        if not (self.peak_flops >= 0 and math.isfinite(self.peak_flops)):
            fail("peak_flops", "a number >= 0 (FLOP/s; 0 = table or measured)")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "a number in [0, 1]")
        if self.verify_data not in VERIFY_MODES:
            fail("verify_data", "one of " + ", ".join(VERIFY_MODES))
        if self.activation_checkpointing not in MODES:
            fail("activation_checkpointing", "one of " + ", ".join(MODES))
        if self.eval_suite not in EVAL_SUITE_MODES:
            fail("eval_suite", "one of " + ", ".join(EVAL_SUITE_MODES))
        if self.schedule not in ("cosine", "wsd"):
            fail("schedule", "'cosine' or 'wsd'")
        if not 0 < self.decay_fraction <= 1:
            fail("decay_fraction", "a number in (0, 1]")
        if not 0 <= self.mix_pretrain < 1:
            fail("mix_pretrain", "a fraction in [0, 1)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepspeed launch/train.py",
        description="Train a DeepSeek-style MoE model with DeepSpeed. Precedence: defaults < --config JSON < flags.",
    )
    parser.add_argument("--config", help="training JSON file with any of the options below (keys use underscores)")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        names = [flag, "--deepspeed"] if spec.name == "deepspeed_config" else [flag]
        if spec.type == "bool":
            parser.add_argument(*names, dest=spec.name, action="store_true", default=None, help=spec.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(spec.type).split(" |")[0], str)
        suffix = "" if spec.default in (None, "") else f" (default: {spec.default})"
        parser.add_argument(*names, dest=spec.name, type=kind, default=None, help=spec.metadata["help"] + suffix)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    # fault injection for the tests (see FaultInjection)
    parser.add_argument("--inject-nan-at", default="", help=argparse.SUPPRESS)
    parser.add_argument("--inject-kill-during-save", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--inject-full-disk-at", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


@dataclass(frozen=True)
class FaultInjection:
    """Failures the tests provoke on purpose (hidden flags): a NaN loss at these steps; rank 0 killed by
    SIGKILL inside this step's checkpoint save, before it is marked complete; every rank's save of this step
    failing as on a full disk (after DeepSpeed wrote its files)."""

    nan_at: frozenset[int] = frozenset()
    kill_during_save_at: int | None = None
    full_disk_at: int | None = None


def parse_train_args(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str], FaultInjection]:
    """(config, names of the flags given on the command line, fault injection for the tests)."""
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
    faults = FaultInjection(frozenset(int(step) for step in args.inject_nan_at.split(",") if step),
                            args.inject_kill_during_save if args.inject_kill_during_save >= 0 else None,
                            args.inject_full_disk_at if args.inject_full_disk_at >= 0 else None)
    return config, frozenset(explicit), faults


def load_train_json(path: str) -> dict[str, Any]:
    data = read_json_object(path, "training config")
    reject_unknown_keys(data, (f.name for f in dataclasses.fields(TrainConfig)), path)
    return data
