"""DeepSpeed's checkpoint files, read without running pickled code, and what we add to them per rank.

* `load_data_only` / `check_data_only`: `torch.load(weights_only=True)` with stand-ins for the three record classes
  DeepSpeed pickles, so that a file holding anything else is refused, never run;
* each rank's RNG states (`client_rank{r:05d}.pt`, written beside DeepSpeed's files);
* the per-expert format of expert-parallel runs: one DeepSpeed file per global expert,
  `layer_L_expert_E_mp_rank_00_model_states.pt` (`node_files.EXPERT_FILE`), whose keys are
  `{experts module}.deepspeed_moe.experts.deepspeed_experts.{E}.{gate_up_proj|down_proj}`
  (`expert_key` / `parse_expert_key`: the one definition of that format).
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_moe.atomic import AtomicFile
from gpt_moe.errors import CheckpointError, first_line
from gpt_moe.model.moe import EXPERT_WEIGHTS

# DeepSpeed pickles three of its own classes into its checkpoint files: small records of plain values
DEEPSPEED_RECORDS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class DeepSpeedRecord:
    """Stands in for DeepSpeed's pickled record classes (DEEPSPEED_RECORDS), so that checkpoint files load
    with `weights_only=True` without importing DeepSpeed; the record's values are kept in `args`."""

    def __init__(self, *args: Any) -> None:
        self.args = args


def load_data_only(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors, containers, numbers, strings and DeepSpeed's records only.
    Anything else in the pickle (a class, a function, a `__reduce__` payload) is refused with a
    CheckpointError naming what it found; it is never run. A missing, truncated or damaged file is one
    CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals([(DeepSpeedRecord, name) for name in DEEPSPEED_RECORDS]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f"it pickles {found[1]}" if found else first_line(err, 120)
        raise CheckpointError(f"{path}: holds more than tensors and plain data ({what}); refusing to load it: "
                              "a loader that unpickles freely would run code from it; use only checkpoints written "
                              "by gpt-moe that you trust") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete, use an earlier one") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # torch's zip reader on a truncated file, ...
        raise CheckpointError(f"{path}: unreadable ({first_line(err, 200)}); the file is damaged or truncated, "
                              "use an earlier checkpoint") from None


def check_data_only(tag_dir: Path) -> None:
    """Every file DeepSpeed's loader would unpickle (`*.pt` in the tag) holds data only; CheckpointError naming
    the first that does not. DeepSpeed loads with `weights_only=False`, which runs whatever code a pickle
    carries: this check runs first, with the safe loader, so a planted payload is refused, not executed."""
    for file in sorted(Path(tag_dir).rglob("*.pt")):
        load_data_only(file, mmap=True)  # CheckpointError naming the file: code in it, or damaged


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    with AtomicFile(tag_dir / f"client_rank{rank:05d}.pt") as f:
        torch.save({"rng": rng_state()}, f)


def load_rank_state(tag_dir: Path, rank: int) -> bool:
    """Restores this rank's RNG states if the checkpoint has them (not when the world size grew)."""
    path = tag_dir / f"client_rank{rank:05d}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    return True


DEEPSPEED_EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_EXPERT_KEY = re.compile(r"^(.*\.experts)\." + re.escape(DEEPSPEED_EXPERT_PREFIX) + r"(\d+)\.(\w+)$")


ROUTED_EXPERT_PARAM = re.compile(rf"\.experts\.({'|'.join(EXPERT_WEIGHTS)})$")


def is_routed_expert_param(name: str) -> bool:
    """A stacked routed-expert weight of the model (`...mlp.experts.gate_up_proj`): [n_experts, ...]."""
    return ROUTED_EXPERT_PARAM.search(name) is not None


def expert_key(local_key_prefix: str, expert: int, name: str) -> str:
    """Key of one expert's weight in DeepSpeed's per-expert files: `{prefix}deepspeed_moe...{expert}.{name}`."""
    return f"{local_key_prefix}{DEEPSPEED_EXPERT_PREFIX}{expert}.{name}"


def parse_expert_key(key: str) -> tuple[str, int, str] | None:
    """(experts module name, expert id, weight name) of a key made by `expert_key`, or None."""
    match = _EXPERT_KEY.match(key)
    return (match[1], int(match[2]), match[3]) if match else None
