"""What a path to a model is, read from its records alone: the one reader behind `--init-from`, `--resume`,
`--tokenizer-from`, the sampler, the app, export and reshard. Torch-free (`python -m data_prep` uses it); the
tensors are read by `gpt_moe.checkpoint.loading`.

A user may give

    runs/<run>                            a run directory: its newest complete checkpoint
    runs/<run>/checkpoints/step_N         a checkpoint tag (DeepSpeed's files, COMPLETE, model config, tokenizer)
    OUT (launch/reshard.py)               a layout-free checkpoint: one file per parameter, run_state.pt, COMPLETE
    OUT (launch/export.py)                a gpt-moe export: config.json, safetensors, gpt_moe.json, tokenizer files
    a transformers directory              config.json (model_type deepseek_v3 or deepseek_v2), safetensors (FP8
                                          block-scaled included), and the model's own tokenizer files when it ships
                                          them (tokenizer.json or tiktoken.model, ...)

    directory = ModelDirectory.open("runs/tiny")
    directory.kind       # "checkpoint" | "layout-free" | "export" | "transformers"
    directory.path       # where the weights are (the newest tag of a run)
    directory.config     # ModelConfig
    directory.tokenizer  # TokenizerInfo; for a transformers directory its own tokenizer's (None if it has none)
    directory.training   # TrainingFacts (step, validation loss, chat, precision, ...; empty when unknown)
    directory.record     # the CheckpointRecord of a checkpoint (None for exports)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gpt_moe.checkpoint.node_files import require_files
from gpt_moe.checkpoint.records import (COMPLETE, MODEL_CONFIG_FILE, TAG_PREFIX, TOKENIZER_INFO_FILE, CheckpointRecord,
                                        TrainingFacts, newest_complete, read_record)
from gpt_moe.data.published_tokenizer import read_published
from gpt_moe.data.tokenizer import TokenizerInfo
from gpt_moe.errors import CheckpointError, GptMoeError, first_line
from gpt_moe.model.config import ModelConfig, from_hf_config

HF_CONFIG_FILE = "config.json"
EXPORT_RECORD_FILE = "gpt_moe.json"
"""An export's own record: our exact model config, the tokenizer record and the training facts."""
MTP_FILE = "mtp.safetensors"
"""An export's multi-token-prediction block (transformers' DeepseekV3ForCausalLM has none)."""
RUN_STATE_FILE = "run_state.pt"
"""A layout-free checkpoint's counters, schedule, buffers and RNG states (`gpt_moe.checkpoint.reshard`)."""
TRAIN_HINT = "train one with `deepspeed launch/train.py --deepspeed ds_configs/zero2.json`"
KINDS = ("checkpoint", "layout-free", "export", "transformers")


def locate(path: str | Path) -> tuple[Path, str]:
    """(the directory holding the weights, its kind) for a path a user gave; CheckpointError (one line) when there
    is no model there. Reads which files exist and nothing else."""
    path = Path(path)
    expected = (f"expected a run directory, a checkpoints/{TAG_PREFIX}* directory or an exported directory with "
                f"{HF_CONFIG_FILE}")
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CheckpointError(f"{path}: no checkpoint here ({what}); {expected}; {TRAIN_HINT}")
    if (path / HF_CONFIG_FILE).is_file():
        return path, "export" if (path / EXPORT_RECORD_FILE).is_file() else "transformers"
    tag = path if (path / COMPLETE).is_file() else newest_complete(path)
    if tag is not None:
        return tag, "layout-free" if (tag / RUN_STATE_FILE).is_file() else "checkpoint"
    if path.name.startswith(TAG_PREFIX) or any(path.glob("*.pt")):
        read_record(path)  # raises "interrupted while saving" or "not a checkpoint"
    raise CheckpointError(f"{path}: no checkpoint here ({expected}); {TRAIN_HINT}")


def read_tokenizer_record(directory: Path, kind: str) -> TokenizerInfo | None:
    """The tokenizer record of a located directory; for a transformers directory the record of the tokenizer files it
    ships (`gpt_moe.data.published_tokenizer`), None when it ships none."""
    if kind == "transformers":
        found = read_published(directory)
        return None if found is None else found[1]
    if kind == "export":
        return TokenizerInfo.from_dict(_json(directory / EXPORT_RECORD_FILE)["tokenizer"],
                                       str(directory / EXPORT_RECORD_FILE))
    file = directory / TOKENIZER_INFO_FILE
    if not file.is_file():
        raise CheckpointError(f"{directory}: {TOKENIZER_INFO_FILE} is missing; this checkpoint was not written by "
                              "gpt-moe's trainer")
    return TokenizerInfo.from_dict(_json(file), str(file))


@dataclass(frozen=True)
class ModelDirectory:
    """A model on disk, described from its records (see the module docstring)."""

    path: Path
    kind: str
    config: ModelConfig
    tokenizer: TokenizerInfo | None
    training: TrainingFacts
    record: CheckpointRecord | None = None

    @classmethod
    def open(cls, path: str | Path) -> ModelDirectory:
        """Locates and describes the model at `path`; one CheckpointError when it cannot be read."""
        directory, kind = locate(path)
        try:
            return cls._read(directory, kind)
        except GptMoeError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: cannot read this model ({type(err).__name__}: {first_line(err)}); "
                                  "expected a training checkpoint, a gpt-moe export or a transformers DeepseekV3/V2 "
                                  "directory") from None

    @classmethod
    def _read(cls, directory: Path, kind: str) -> ModelDirectory:
        record = read_record(directory) if kind in ("checkpoint", "layout-free") else None
        if record is not None:
            require_files(directory, record)  # written on node-local disks: gathered first
        tokenizer = read_tokenizer_record(directory, kind)
        if kind == "export":
            ours = _json(directory / EXPORT_RECORD_FILE)
            config = ModelConfig.from_dict(ours["model_config"], str(directory / EXPORT_RECORD_FILE))
            training = TrainingFacts.from_dict(ours.get("training", {}), f"{directory / EXPORT_RECORD_FILE}: training")
            return cls(directory, kind, config, tokenizer, training)
        if kind == "transformers":
            config = from_hf_config(_json(directory / HF_CONFIG_FILE), directory.name, str(directory / HF_CONFIG_FILE))
            return cls(directory, kind, config, tokenizer, TrainingFacts())
        if not (directory / MODEL_CONFIG_FILE).is_file():
            raise CheckpointError(f"{directory}: {MODEL_CONFIG_FILE} is missing; this checkpoint was not written by "
                                  "gpt-moe's trainer")
        return cls(directory, kind, ModelConfig.from_json(directory / MODEL_CONFIG_FILE), tokenizer, record.facts,
                   record)

    @property
    def is_checkpoint(self) -> bool:
        """A training checkpoint (DeepSpeed's files or the layout-free form), which `--resume` takes."""
        return self.record is not None


def _json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a JSON {type(data).__name__}, expected an object")
    return data
