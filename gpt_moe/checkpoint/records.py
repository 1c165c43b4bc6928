"""Training checkpoints on disk: run and tag directories, complete-only visibility, keep-last-N, and the typed
records a checkpoint holds besides DeepSpeed's tensors. Torch-free (`data_prep --tokenizer-from` reads it).

    runs/<run>/checkpoints/
        step_00000100/              DeepSpeed files (model states, ZeRO optimizer shards, expert files)
            client_rank00000.pt     our per-rank state (RNG states), written by each rank
            model_config.json       the model, and the tokenizer (tokenizer_info.json + its files): what inference
            tokenizer_info.json     needs besides the weights
            COMPLETE                `CheckpointRecord` as JSON, written by rank 0 after every rank finished writing
        latest                      DeepSpeed's pointer, written before the save is complete: never trusted alone

On node-local disks (`gpt_moe.train.disks`) every node holds such a tag directory with its own ranks' files, the
inference files and the same COMPLETE record, which lists the files each node holds (`NodeFiles`); what a reader
needs from the other nodes is `gpt_moe.checkpoint.node_files`.

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
from gpt_moe.checkpoint.evaluation import Evaluation
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
RUN_CONFIG_FILE = "train_config.json"  # the resolved training config, written into the run directory by every run
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
class NodeFiles:
    """The files of a checkpoint tag that node `node` (on `host`, holding global ranks `ranks`) wrote on its own
    disk: a record written on node-local disks keeps one per node."""

    node: int
    host: str
    ranks: tuple[int, ...]
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "host": self.host, "ranks": list(self.ranks), "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeFiles:
        """From its JSON object; KeyError, TypeError or ValueError when malformed."""
        return cls(int(data["node"]), str(data["host"]), tuple(map(int, data["ranks"])), tuple(map(str, data["files"])))


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


HEADLINE_FIGURES = ("val_loss", "val_bpb", "mtp_acceptance")
"""The figures records kept as keys of their own before the evaluation record existed: still written beside it, so
older readers find them, and read from older records."""


def evaluation_from(data: dict[str, Any], where: str) -> Evaluation | None:
    """The evaluation of a record's (or a training section's) JSON object: its "evaluation", or for an older record
    the headline figures it kept (None when it has none)."""
    if data.get("evaluation") is not None:
        return Evaluation.from_dict(data["evaluation"], where)
    figures = {name: data[name] for name in HEADLINE_FIGURES if isinstance(data.get(name), (int, float))}
    figures = {name: float(value) for name, value in figures.items() if math.isfinite(value)}
    return Evaluation(figures, data.get("step")) if figures else None


class HasEvaluation:
    """The headline figures of a record's evaluation, as attributes (None where not evaluated)."""

    evaluation: Evaluation | None

    def figure(self, name: str) -> float | None:
        return self.evaluation.get(name) if self.evaluation is not None else None

    @property
    def val_bpb(self) -> float | None:
        """Validation bits per byte (`gpt_moe.data.bits_per_byte`)."""
        return self.figure("val_bpb")

    @property
    def mtp_acceptance(self) -> float | None:
        return self.figure("mtp_acceptance")

    def headline(self) -> dict[str, float | None]:
        """The headline figures as the flat keys records keep beside the evaluation."""
        return {name: self.figure(name) for name in HEADLINE_FIGURES}


@dataclass(frozen=True)
class TrainingFacts(HasEvaluation):
    """What is known of a model's training, as the app, the sampler and export show it: a checkpoint's record, or the
    `training` section of an export (whatever fields it has; None where unknown)."""

    step: int | None = None
    tokens_seen: int | None = None
    chat: bool = False  # fine-tuned on conversations: the app and the sampler chat with it
    bf16: bool | None = None  # trained in bf16 (None: unknown)
    model: str | None = None
    init_from: str | None = None
    evaluation: Evaluation | None = None  # the last evaluation of the run (`gpt_moe.checkpoint.evaluation`)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "training facts") -> TrainingFacts:
        """From an export's `training` section (a checkpoint record's JSON, or part of one); other keys ignored."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"evaluation"}
        values = {key: value for key, value in data.items() if key in fields and value is not None}
        return cls(**{**values, "chat": bool(values.get("chat", False))}, evaluation=evaluation_from(data, where))

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in dataclasses.asdict(self).items()
                if value is not None and key != "evaluation"}
        if self.evaluation is not None:
            data.update({**{k: v for k, v in self.headline().items() if v is not None},
                         "evaluation": self.evaluation.to_dict()})
        return data

    @property
    def val_loss(self) -> float | None:
        return self.figure("val_loss")

    @property
    def has_val_loss(self) -> bool:
        return self.val_loss is not None

    @property
    def bpb_text(self) -> str:
        """", 1.2345 bits/byte" when the validation bits per byte are known, else ""."""
        return f", {self.val_bpb:.4f} bits/byte" if self.val_bpb is not None else ""


@dataclass(frozen=True)
class CheckpointRecord(HasEvaluation):
    """A checkpoint tag's COMPLETE file: written by rank 0 once every rank has written its files (the tag exists for
    readers from then on), read by everything that uses a checkpoint. `expert_ranges[r]` is [first, end) of the
    routed experts rank r held (None for ranks without MoE layers, or in records written before it existed).
    A layout-free conversion (`format` LAYOUT_FREE) keeps the source's record and names the `source` tag.
    `evaluation`: the run's last evaluation before the save (None when it has not evaluated yet). `nodes`: which
    node holds which files, for a checkpoint written on node-local disks (None: every file is in the tag directory).
    """

    step: int
    layout: Layout
    tokens_seen: int = 0
    expert_ranges: tuple[tuple[int, int] | None, ...] | None = None
    model: str | None = None
    chat: bool = False
    init_from: str | None = None
    completed_at: float | None = None
    format: str | None = None
    source: str | None = None
    evaluation: Evaluation | None = None
    nodes: tuple[NodeFiles, ...] | None = None

    REQUIRED = ("step", "world_size", "ep_size", "zero_stage")

    @property
    def is_layout_free(self) -> bool:
        return self.format == LAYOUT_FREE

    @property
    def val_loss(self) -> float:
        """The last validation loss; NaN when not evaluated."""
        value = self.figure("val_loss")
        return float("nan") if value is None else value

    @property
    def facts(self) -> TrainingFacts:
        return TrainingFacts(self.step, self.tokens_seen, self.chat, self.layout.bf16, self.model, self.init_from,
                             self.evaluation)

    def to_json(self) -> str:
        data = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.layout.world_size,
                "ep_size": self.layout.ep_size,
                "expert_ranges": None if self.expert_ranges is None else [list(r) if r else None
                                                                          for r in self.expert_ranges],
                "zero_stage": self.layout.zero_stage, "bf16": self.layout.bf16, **self.headline(),
                "val_loss": self.val_loss, "model": self.model, "chat": self.chat, "init_from": self.init_from,
                "completed_at": self.completed_at,
                "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None}
        if self.format is not None:
            data.update({"format": self.format, "source": self.source})
        if self.nodes is not None:
            data["nodes"] = [node.to_dict() for node in self.nodes]
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
            ranges, nodes = data.get("expert_ranges"), data.get("nodes")
            return cls(int(data["step"]), layout, int(data.get("tokens_seen", 0)),
                       None if ranges is None else tuple(tuple(map(int, r)) if r else None for r in ranges),
                       data.get("model"), bool(data.get("chat", False)), data.get("init_from"),
                       data.get("completed_at"), data.get("format"), data.get("source"), evaluation_from(data, where),
                       None if nodes is None else tuple(NodeFiles.from_dict(node) for node in nodes))
        except (KeyError, TypeError, ValueError) as err:
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
    """Marks `tag_dir` complete (the last file of a checkpoint), at the record's `completed_at` or now."""
    completed_at = record.completed_at if record.completed_at is not None else time.time()
    write_atomic(Path(tag_dir) / COMPLETE, dataclasses.replace(record, completed_at=completed_at).to_json())


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
