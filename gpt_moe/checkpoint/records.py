"""Training checkpoints on disk: run and tag directories, complete-only visibility, keep-last-N, and the typed
records a checkpoint holds besides DeepSpeed's tensors. Torch-free (`data_prep --tokenizer-from` reads it).

    runs/<run>/checkpoints/
        step_00000100/              DeepSpeed files (model states, ZeRO optimizer shards, expert files)
            client_rank00000.pt     our per-rank state (RNG states), written by each rank
            model_config.json       the model, and the tokenizer (tokenizer_info.json + its files): what inference
            tokenizer_info.json     needs besides the weights
            COMPLETE                `CheckpointRecord` as JSON, written by rank 0 after every rank finished writing
        latest                      DeepSpeed's pointer, written before the save is complete: never trusted alone

A tag directory without COMPLETE (a save killed part-way) is ignored on resume and removed when a newer checkpoint
completes. The run's counters and data position travel inside DeepSpeed's model-states file as its client state
(`ClientState`). This module is the only reader and writer of both records; what DeepSpeed writes, and how it is
read without running pickled code, is `gpt_moe.checkpoint.deepspeed_files`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt_moe.atomic import write_atomic
from gpt_moe.data.tokenizer import TokenizerInfo
from gpt_moe.data.tokenizer_format import copy_tokenizer_files
from gpt_moe.dir_lock import DirectoryLock
from gpt_moe.errors import CheckpointError, ConfigError, first_line
from gpt_moe.model.config import ModelConfig

RUNS_DIR = "runs"
"""Where runs go by default (`runs/<model>`) and where the app and the sampler look for the newest checkpoint."""
CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
TAG_PREFIX = "step_"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_INFO_FILE = "tokenizer_info.json"
RUN_LOCK_FILE = ".run.lock"
"""The lock a training run holds on its run directory (`run_directory_lock`)."""
LAYOUT_FREE = "layout-free"
"""`CheckpointRecord.format` of a checkpoint converted by `python launch/reshard.py` (`gpt_moe.checkpoint.reshard`)."""


def run_directory_lock(run_dir: str | Path) -> DirectoryLock:
    """One training run per run directory: the lock global rank 0 holds for the run's life (taken by `acquire`)."""
    return DirectoryLock(run_dir, RUN_LOCK_FILE, "--run-dir", "training run", ConfigError)


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


# ---------------------------------------------------------------------- the records
@dataclass(frozen=True)
class Layout:
    """How a run spreads over ranks and in which precision it trains: what a checkpoint's files depend on, and
    what resharding converts between. `bf16` is None in records written before it was recorded."""

    world_size: int
    ep_size: int
    zero_stage: int
    bf16: bool | None

    def matches(self, other: Layout) -> bool:
        """The same layout (an unrecorded precision matches either)."""
        same_precision = self.bf16 is None or other.bf16 is None or self.bf16 == other.bf16
        return (self.world_size, self.ep_size, self.zero_stage) == (other.world_size, other.ep_size,
                                                                   other.zero_stage) and same_precision

    def describe(self) -> str:
        ranks = self.world_size
        precision = {True: "bf16", False: "fp32", None: "precision not recorded"}[self.bf16]
        return f"{ranks} rank{'s' if ranks != 1 else ''}, EP {self.ep_size}, ZeRO-{self.zero_stage}, {precision}"


@dataclass(frozen=True)
class TrainingFacts:
    """What is known of a model's training, as the app, the sampler and export show it: a checkpoint's record, or the
    `training` section of an export (whatever fields it has; None where unknown)."""

    step: int | None = None
    tokens_seen: int | None = None
    val_loss: float | None = None
    chat: bool = False  # fine-tuned on conversations: the app and the sampler chat with it
    mtp_acceptance: float | None = None
    bf16: bool | None = None  # trained in bf16 (None: unknown)
    model: str | None = None
    init_from: str | None = None
    val_bpb: float | None = None  # validation bits per byte (`gpt_moe.data.bits_per_byte`)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingFacts:
        """From an export's `training` section (a checkpoint record's JSON, or part of one); other keys ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields and value is not None}
        return cls(**{**values, "chat": bool(values.get("chat", False))})

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def has_val_loss(self) -> bool:
        return isinstance(self.val_loss, (int, float)) and math.isfinite(self.val_loss)

    @property
    def bpb_text(self) -> str:
        """", 1.2345 bits/byte" when the validation bits per byte are known, else ""."""
        return f", {self.val_bpb:.4f} bits/byte" if self.val_bpb is not None else ""


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint tag's COMPLETE file: written by rank 0 once every rank has written its files (the tag exists for
    readers from then on), read by everything that uses a checkpoint. `expert_ranges[r]` is [first, end) of the
    routed experts rank r held (None for ranks without MoE layers, or in records written before it existed).
    A layout-free conversion (`format` LAYOUT_FREE) keeps the source's record and names the `source` tag."""

    step: int
    layout: Layout
    tokens_seen: int = 0
    expert_ranges: tuple[tuple[int, int] | None, ...] | None = None
    val_loss: float = float("nan")
    model: str | None = None
    chat: bool = False
    mtp_acceptance: float | None = None
    init_from: str | None = None
    completed_at: float | None = None
    format: str | None = None
    source: str | None = None
    val_bpb: float | None = None  # None in records written before it was recorded

    REQUIRED = ("step", "world_size", "ep_size", "zero_stage")

    @property
    def is_layout_free(self) -> bool:
        return self.format == LAYOUT_FREE

    @property
    def facts(self) -> TrainingFacts:
        return TrainingFacts(self.step, self.tokens_seen, self.val_loss, self.chat, self.mtp_acceptance,
                             self.layout.bf16, self.model, self.init_from, self.val_bpb)

    def to_json(self) -> str:
        data = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.layout.world_size,
                "ep_size": self.layout.ep_size,
                "expert_ranges": None if self.expert_ranges is None else [list(r) if r else None
                                                                          for r in self.expert_ranges],
                "zero_stage": self.layout.zero_stage, "bf16": self.layout.bf16, "val_loss": self.val_loss,
                "val_bpb": self.val_bpb, "model": self.model, "chat": self.chat, "mtp_acceptance": self.mtp_acceptance,
                "init_from": self.init_from, "completed_at": self.completed_at}
        if self.format is not None:
            data.update({"format": self.format, "source": self.source})
        return json.dumps(data, indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CheckpointRecord:
        """From its JSON object; CheckpointError naming the missing or malformed key."""
        missing = [key for key in cls.REQUIRED if key not in data]
        if missing:
            raise CheckpointError(f"{where}: lacks {', '.join(missing)}; the checkpoint is damaged or was not "
                                  "written by gpt-moe, resume from an earlier one")
        try:
            layout = Layout(int(data["world_size"]), int(data["ep_size"]), int(data["zero_stage"]),
                            None if data.get("bf16") is None else bool(data["bf16"]))
            ranges = data.get("expert_ranges")
            return cls(int(data["step"]), layout, int(data.get("tokens_seen", 0)),
                       None if ranges is None else tuple(tuple(map(int, r)) if r else None for r in ranges),
                       float(data.get("val_loss", float("nan"))), data.get("model"), bool(data.get("chat", False)),
                       data.get("mtp_acceptance"), data.get("init_from"), data.get("completed_at"),
                       data.get("format"), data.get("source"),
                       None if data.get("val_bpb") is None else float(data["val_bpb"]))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: malformed record ({first_line(err)}); the checkpoint is damaged, "
                                  "resume from an earlier one") from None


@dataclass(frozen=True)
class ClientState:
    """What our trainer adds to DeepSpeed's model-states file (`save_checkpoint(client_state=...)`): the run's
    counters, the data reader's position and the configs it ran with. `data` is the reader's `state_dict()`."""

    step: int
    tokens_seen: int
    data: dict[str, Any]
    trained_tokens: int = 0  # chat data: assistant tokens trained on so far
    bad_steps_total: int = 0
    train_config: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    ds_config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    world_size: int | None = None
    ep_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientState:
        """From DeepSpeed's model-states file (its own keys ignored) or a layout-free checkpoint's run state."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})


# ---------------------------------------------------------------------- tags and runs
def write_record(tag_dir: Path, record: CheckpointRecord) -> None:
    """Marks `tag_dir` complete (the last file of a checkpoint)."""
    write_atomic(Path(tag_dir) / COMPLETE, dataclasses.replace(record, completed_at=time.time()).to_json())


def read_record(tag_dir: str | Path) -> CheckpointRecord:
    """The COMPLETE record of a checkpoint tag; CheckpointError saying what `tag_dir` is when it has none."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        if not tag_dir.is_dir():
            raise CheckpointError(f"{tag_dir}: no such checkpoint directory; expected {RUNS_DIR}/<run>/"
                                  f"{CHECKPOINTS_DIR}/{TAG_PREFIX}N or a run directory")
        if not any(tag_dir.glob("*.pt")):
            raise CheckpointError(f"{tag_dir}: not a checkpoint (no {COMPLETE} marker and no DeepSpeed files); "
                                  f"expected {RUNS_DIR}/<run>/{CHECKPOINTS_DIR}/{TAG_PREFIX}N or a run directory")
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint (no {COMPLETE} marker); "
                              "it was interrupted while saving, resume from an earlier one")
    try:
        data = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{marker}: not valid JSON ({err}); the checkpoint is damaged, "
                              "resume from an earlier one") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{marker}: lacks {', '.join(CheckpointRecord.REQUIRED)}; the checkpoint is damaged "
                              "or was not written by gpt-moe, resume from an earlier one")
    return CheckpointRecord.from_dict(data, str(marker))


def complete_tags(checkpoint_dir: Path) -> list[Path]:
    """Complete tag directories of a run's checkpoints/ directory, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*") if (p / COMPLETE).is_file())


def newest_complete(path: str | Path) -> Path | None:
    """The newest complete tag of a run directory or of its checkpoints/ directory; None when there is none."""
    path = Path(path)
    for checkpoint_dir in (path / CHECKPOINTS_DIR, path):
        done = complete_tags(checkpoint_dir)
        if done:
            return done[-1]
    return None


def newest_under(runs_dir: str | Path = RUNS_DIR) -> Path | None:
    """The most recently completed checkpoint of any run under `runs_dir`."""
    candidates = [p for p in Path(runs_dir).glob(f"*/{CHECKPOINTS_DIR}/{TAG_PREFIX}*") if (p / COMPLETE).is_file()]
    return max(candidates, key=lambda p: (p / COMPLETE).stat().st_mtime, default=None)


def prune(checkpoint_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than the
    newest complete. Returns what was removed. Rank 0 only, after the newest is marked complete."""
    done = complete_tags(checkpoint_dir)
    if not done:
        return []
    newest = done[-1]
    doomed = done[:-keep_last] if keep_last > 0 else []
    doomed += [p for p in checkpoint_dir.glob(f"{TAG_PREFIX}*")
               if p.is_dir() and not (p / COMPLETE).is_file() and p.name < newest.name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def describe_save_failure(err: BaseException, checkpoint_dir: Path) -> str:
    """Why a save failed, in words: the OS's reason, or "no space left" when the disk is (nearly) full --
    torch.save reports a full disk only as "unexpected pos"."""
    free = shutil.disk_usage(checkpoint_dir if checkpoint_dir.exists() else checkpoint_dir.parent).free
    if getattr(err, "errno", None) == errno.ENOSPC or free < 64 * 1024 ** 2:
        return f"no space left on the device; {free / 1024 ** 2:.0f} MiB free now"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return first_line(err, 200)


def save_inference_files(tag_dir: Path, model_config: ModelConfig, tokenizer: TokenizerInfo, data_dir: Path) -> None:
    """What a checkpoint needs besides DeepSpeed's files to be used alone: model config and tokenizer (its record and
    its files, copied unchanged from the data directory: a published model's own files stay the model's)."""
    write_atomic(tag_dir / MODEL_CONFIG_FILE, json.dumps(model_config.to_dict(), indent=1))
    write_atomic(tag_dir / TOKENIZER_INFO_FILE, json.dumps(tokenizer.to_dict(), indent=1))
    copy_tokenizer_files(tokenizer, Path(data_dir), tag_dir)
