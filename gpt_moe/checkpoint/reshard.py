"""Resume anywhere: a checkpoint's training state without its layout, and loading it into any engine.

What a checkpoint means does not depend on how many ranks wrote it: per parameter, the fp32 master
weight and both Adam moments; one Adam step count; routed experts by global expert id; the
balancing biases; the data position, the learning-rate schedule and the run's counters. Two
sources give that state parameter by parameter:

* `DeepSpeedSource`: a DeepSpeed checkpoint of any ZeRO stage and expert-parallel size, read
  from its partitioned files (`gpt_moe.checkpoint.zero_files`) without DeepSpeed's runtime;
* `LayoutFreeSource`: the same state written out once by `convert` (`python launch/reshard.py`),
  one file per parameter and per routed expert:

      OUT/
          COMPLETE              JSON, written last: {"format": "layout-free", step, the source's layout, ...}
          run_state.pt          client state, lr schedule, Adam step, counters, biases, each source rank's RNG
          params/NAME.pt        {"fp32", "exp_avg", "exp_avg_sq"} of one parameter
          params/NAME/E.pt      the same for routed expert E (global id, 5 digits) of a stacked expert weight
          model_config.json, tokenizer files

`load_into_engine` puts either into a freshly built engine of any world size, EP size, ZeRO stage
and precision through DeepSpeed's own tensor-fragment API (`safe_set_full_fp32_param`,
`safe_set_full_optimizer_state`), which knows where each rank's partition of a parameter lives
for every stage; each rank reads only whole parameters and its own experts, one at a time.

RNG on a world-size change: new rank r restores saved rank r's generators when that rank existed,
and otherwise seeds Python, numpy and torch with `seed + 1_000_003 * step + r`. The data order is
unchanged in any layout: the reader's position counts windows of all ranks together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_moe.atomic import AtomicFile, partial_dir, publish_dir
from gpt_moe.checkpoint.deepspeed_files import is_routed_expert_param, load_data_only, set_rng_state
from gpt_moe.checkpoint.model_dir import RUN_STATE_FILE
from gpt_moe.checkpoint.node_files import EXPERT_FILE
from gpt_moe.checkpoint.records import (COMPLETE, LAYOUT_FREE, MODEL_CONFIG_FILE, CheckpointRecord, ClientState,
                                        read_record, write_record)
from gpt_moe.checkpoint.weights import WeightSource, check_finite
from gpt_moe.checkpoint.zero_files import STATE_KEYS, ZeroCheckpoint
from gpt_moe.errors import CheckpointError
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.moe import EXPERT_WEIGHTS

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the two sources
class DeepSpeedSource:
    """The layout-free state of a DeepSpeed checkpoint tag, read from its partitioned files."""

    def __init__(self, tag_dir: Path) -> None:
        self.zero = ZeroCheckpoint(tag_dir)
        self.record, self.tag_dir = self.zero.record, Path(tag_dir)
        self.config = ModelConfig.from_json(self.tag_dir / MODEL_CONFIG_FILE)
        self.n_experts = self.config.n_routed_experts
        self.names = list(self.zero.parameters)
        check_expert_layout(self.tag_dir, self.record, self.n_experts, self._expert_files())

    def _expert_files(self) -> dict[str, list[int]] | None:
        """The experts of each MoE layer's per-expert weight files (ZeRO-1/2 with EP > 1 writes them), else None."""
        if self.record.layout.zero_stage == 3 or self.record.layout.ep_size == 1:
            return None
        files = [(int(m[1]), int(m[2])) for f in self.tag_dir.iterdir() if (m := EXPERT_FILE.search(f.name))]
        layers = sum(is_routed_expert_param(name) and name.endswith(EXPERT_WEIGHTS[0]) for name in self.names)
        return {f"the files of MoE layer {layer} hold": [e for owner, e in files if owner == layer]
                for layer in range(layers)}

    def states(self, name: str) -> dict[str, torch.Tensor]:
        param = self.zero.parameters[name]
        return checked({key: self.zero.read(param, key) for key in STATE_KEYS}, name, self.tag_dir)

    def expert_states(self, name: str, expert: int) -> dict[str, torch.Tensor]:
        param = self.zero.parameters[name]
        return checked({key: self.zero.read_expert(param, expert, key) for key in STATE_KEYS},
                       f"{name} (expert {expert})", self.tag_dir)

    def release(self) -> None:
        """Unmaps what was read so far (call between parameters: memory stays at one parameter's worth)."""
        self.zero.release()

    def run_state(self) -> dict[str, Any]:
        model_states = self.zero.model_states
        module = model_states["module"]
        rng = []
        for rank in range(self.record.layout.world_size):
            path = self.tag_dir / f"client_rank{rank:05d}.pt"
            rng.append(load_data_only(path)["rng"] if path.is_file() else None)
        return {"client": ClientState.from_dict(model_states).to_dict(),
                "lr_scheduler": model_states["lr_scheduler"], "adam_step": self.zero.adam_step(),
                "counters": {key: model_states[key] for key in ("global_steps", "global_samples", "skipped_steps")},
                "buffers": {name: module[name].clone() for name in model_states["buffer_names"] if name in module},
                "rng": rng, "n_experts": self.n_experts, "info": json.loads(self.record.to_json())}


class LayoutFreeSource:
    """A directory written by `convert`."""

    def __init__(self, directory: Path) -> None:
        self.tag_dir = Path(directory)
        self.record = read_record(self.tag_dir)
        if not self.record.is_layout_free:
            raise CheckpointError(f"{self.tag_dir}: {RUN_STATE_FILE} but no layout-free {COMPLETE} record")
        self._run_state = load_data_only(self.tag_dir / RUN_STATE_FILE)
        self.names = list(self._run_state["parameters"])
        self.n_experts = self._run_state["n_experts"]
        present = {f"params/{name}/ holds": [int(f.stem) for f in (self.tag_dir / "params" / name).glob("*.pt")]
                   for name in self.names if is_routed_expert_param(name)}
        check_expert_layout(self.tag_dir, self.record, self.n_experts, present)

    def states(self, name: str) -> dict[str, torch.Tensor]:
        return checked(_load_states(self.tag_dir / "params" / f"{name}.pt"), name, self.tag_dir)

    def expert_states(self, name: str, expert: int) -> dict[str, torch.Tensor]:
        return checked(_load_states(self.tag_dir / "params" / name / f"{expert:05d}.pt"), f"{name} (expert {expert})",
                       self.tag_dir)

    def run_state(self) -> dict[str, Any]:
        return self._run_state

    def release(self) -> None:
        """Nothing stays mapped: each parameter's file is read whole and dropped."""

    def full_states(self, name: str, keys: tuple[str, ...] = STATE_KEYS) -> dict[str, torch.Tensor]:
        """A whole parameter's `keys` states; a stacked expert weight with every routed expert: [n_experts, ...]."""
        if not is_routed_expert_param(name):
            return {key: value for key, value in self.states(name).items() if key in keys}
        experts = [self.expert_states(name, e) for e in range(self.n_experts)]
        return {key: torch.stack([states[key] for states in experts]) for key in keys}


def checked(states: dict[str, torch.Tensor], name: str, where: Path) -> dict[str, torch.Tensor]:
    """A parameter's states (fp32 master, Adam moments), refused in one line naming it and the state unless each is
    a floating-point tensor of finite values."""
    for key, value in states.items():
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            what = str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: the {key} state of {name} is {what}, expected floating-point values; the "
                                  "checkpoint is damaged, use an earlier one")
        check_finite(value, f"the {key} state of {name}", where)
    return states


def _load_states(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the layout-free checkpoint; convert it again")
    return load_data_only(path)


class LayoutFreeWeights(WeightSource):
    """A layout-free checkpoint (`python launch/reshard.py`): each parameter's fp32 master weight from its own file
    (routed experts one file each), memory-mapped so that the Adam moments beside it are not read."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.source = LayoutFreeSource(directory)
        self.buffers: dict[str, Any] = self.source.run_state()["buffers"]
        for name, shape in self.source.run_state()["parameters"].items():
            self.shapes[name], self.dtypes[name] = tuple(shape), torch.float32
        for name, value in self.buffers.items():
            self.shapes[name], self.dtypes[name] = tuple(value.shape), value.dtype

    def _read_into(self, name: str, out: torch.Tensor, experts: range | None) -> None:
        if name in self.buffers:
            out.copy_(self.buffers[name])
        elif is_routed_expert_param(name):
            for j, e in enumerate(experts or range(self.source.n_experts)):
                out[j].copy_(self._fp32(self.path / "params" / name / f"{e:05d}.pt"))
                self.stats.add(out[j], True)
        else:
            out.copy_(self._fp32(self.path / "params" / f"{name}.pt"))
            self.stats.add(out, False)

    def _fp32(self, file: Path) -> torch.Tensor:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the layout-free checkpoint; convert it again")
        return load_data_only(file, mmap=True)["fp32"]


def open_source(tag_dir: Path) -> DeepSpeedSource | LayoutFreeSource:
    return LayoutFreeSource(tag_dir) if (Path(tag_dir) / RUN_STATE_FILE).is_file() else DeepSpeedSource(tag_dir)


def check_expert_layout(tag_dir: Path, record: CheckpointRecord, n_experts: int,
                        present: dict[str, list[int]] | None) -> None:
    """Refuses a checkpoint whose experts disagree with its record: within each expert-parallel group the
    ranks' `expert_ranges` must cover every expert exactly once, and each list of `present` (the experts
    of one layer's files, by a description of where they are), when the format has files per expert, must
    hold every expert once."""
    ranges = [r for r in record.expert_ranges or () if r]
    ep = record.layout.ep_size
    for group in range(len(ranges) // ep if ranges else 0):
        held = [e for first, end in ranges[group * ep:(group + 1) * ep] for e in range(first, end)]
        _refuse_unless_each_once(tag_dir, held, n_experts, f"the ranks of expert-parallel group {group} hold")
    if present is not None:
        for where, held in present.items():
            _refuse_unless_each_once(tag_dir, held, n_experts, where)


def _refuse_unless_each_once(tag_dir: Path, held: list[int], n_experts: int, what: str) -> None:
    missing = sorted(set(range(n_experts)) - set(held))
    repeated = sorted({e for e in held if held.count(e) > 1})
    extra = sorted({e for e in held if not 0 <= e < n_experts})
    if missing or repeated or extra:
        problems = [f"missing experts {missing}" if missing else "", f"experts {repeated} twice" if repeated else "",
                    f"experts {extra} beyond the model's {n_experts}" if extra else ""]
        raise CheckpointError(f"{tag_dir}: {what} {', '.join(p for p in problems if p)}, expected each of the "
                              f"{n_experts} routed experts once; the checkpoint is damaged, use an earlier one")


# ---------------------------------------------------------------------- writing the layout-free form
def convert(tag_dir: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Writes DeepSpeed checkpoint `tag_dir` to `out` in the layout-free form, one parameter (or expert) in
    memory at a time, each state checked (floating-point, finite). Written under `out`.partial and renamed at the
    end, COMPLETE last: an interrupted conversion leaves no `out` and the source untouched, a refused one nothing."""
    source, out = DeepSpeedSource(Path(tag_dir)), Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output directory")
    partial = partial_dir(out)
    try:
        _write_layout_free(source, partial, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # refused (damaged source) or interrupted: nothing left behind
        raise
    return publish_dir(partial, out)


def _write_layout_free(source: DeepSpeedSource, partial: Path, progress: bool) -> None:
    from tqdm import tqdm

    (partial / "params").mkdir()
    run_state = source.run_state()
    shapes = {name: list(source.zero.parameters[name].shape) for name in source.names}
    for name in tqdm(source.names, desc="reshard", unit="param", disable=not progress):
        if is_routed_expert_param(name):
            (partial / "params" / name).mkdir()
            for expert in range(source.n_experts):
                _save(partial / "params" / name / f"{expert:05d}.pt", source.expert_states(name, expert))
            shapes[name][0] = source.n_experts
        else:
            _save(partial / "params" / f"{name}.pt", source.states(name))
        source.release()
    _save(partial / RUN_STATE_FILE, {**run_state, "parameters": shapes})
    for file in source.tag_dir.iterdir():  # model config and tokenizer: what inference needs besides weights
        if file.is_file() and file.suffix != ".pt" and file.name != COMPLETE:
            shutil.copy2(file, partial / file.name)
    write_record(partial, dataclasses.replace(source.record, format=LAYOUT_FREE, source=str(source.tag_dir.resolve()),
                                              completed_at=None, nodes=None))  # its own files, completed now


def _save(path: Path, obj: Any) -> None:
    with AtomicFile(path) as f:
        torch.save(obj, f)


# ---------------------------------------------------------------------- loading into an engine
def load_into_engine(engine, source: DeepSpeedSource | LayoutFreeSource, seed: int) -> ClientState:
    """Puts `source`'s state into a freshly built DeepSpeed engine of any layout; returns the client state
    (step, data position, ...). Every rank calls it; no collective communication happens in it."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_full_optimizer_state

    run_state = source.run_state()
    _materialise_optimizer_state(engine.optimizer)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link the moments' fragments
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    known = set(source.names)
    for name, param in engine.module.named_parameters():
        if name not in known:
            raise CheckpointError(f"{source.tag_dir}: holds no optimizer state for {name} (saved from another model, "
                                  "or frozen there: --freeze-router); resume it on the layout it was saved with")
        full = _full_states(engine.module, source, name)
        expected = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the shape aside
        if tuple(full["fp32"].shape) != expected:
            raise CheckpointError(f"{source.tag_dir}: {name} is {tuple(full['fp32'].shape)} there but {expected} in "
                                  "this model; resume with the model config the checkpoint was trained with")
        safe_set_full_fp32_param(param, full["fp32"].to(param.device))
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's module partition follows from its master partition
            param.ds_tensor.data.copy_(safe_get_local_fp32_param(param).view(-1)[:param.ds_tensor.numel()])
        else:  # ZeRO-1/2: every rank holds the whole module parameter
            param.data.copy_(full["fp32"])
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, full[key].to(param.device), key)
        source.release()
    _set_adam_step(engine.optimizer, run_state["adam_step"])
    _set_schedule(engine, run_state)
    buffers = dict(engine.module.named_buffers())
    for name, value in run_state["buffers"].items():
        buffers[name].data.copy_(value)
    client = ClientState.from_dict(run_state["client"])
    _restore_rng(run_state["rng"], seed, client.step)
    return client


def _full_states(module: torch.nn.Module, source, name: str) -> dict[str, torch.Tensor]:
    """A parameter's states; for a rank's stack of routed experts, its experts' states by global id."""
    if not is_routed_expert_param(name):
        return source.states(name)
    experts = module.get_submodule(name.rsplit(".", 1)[0])
    per_expert = [source.expert_states(name, experts.first_expert + j) for j in range(experts.num_local_experts)]
    return {key: torch.stack([states[key] for states in per_expert]) for key in STATE_KEYS}


def _master_partitions(zero_optimizer) -> list[tuple[int, torch.Tensor]]:
    """(optimizer group, flat fp32 master partition) of this rank: one per group under ZeRO-1/2, one per
    sub-group under ZeRO-3 (whose base optimizer holds a sub-group's partition only while stepping it)."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return [(zero_optimizer.sub_group_to_group_id[i], flat)
                for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)]
    return list(enumerate(zero_optimizer.single_partition_of_fp32_groups))


def _materialise_optimizer_state(zero_optimizer) -> None:
    """Creates the optimizer's state of each master partition where it is still empty (a fresh optimizer
    makes it at its first step): a step with zero gradients at learning rate 0, which changes no weight.
    The values are overwritten right after."""
    base = zero_optimizer.optimizer
    for group_index, flat in _master_partitions(zero_optimizer):
        if base.state.get(flat):
            continue
        group = base.param_groups[group_index]
        params, lr = group["params"], group["lr"]
        group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
        try:
            base.step()
        finally:
            group["params"], group["lr"], flat.grad = params, lr, None


def _set_adam_step(zero_optimizer, step: int) -> None:
    """The step count wherever the optimizer keeps it (per partition in torch's Adam, per group in some)."""
    base = zero_optimizer.optimizer
    for group in base.param_groups:
        if "step" in group:
            group["step"] = step
    for _, flat in _master_partitions(zero_optimizer):
        state = base.state.get(flat, {})
        if "step" in state:
            old = state["step"]
            state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else step


def _set_schedule(engine, run_state: dict[str, Any]) -> None:
    """Learning-rate schedule position and the engine's step counters. All our groups follow one schedule, so
    the saved learning rate applies to however many groups this layout has."""
    saved = run_state["lr_scheduler"]
    scheduler = engine.lr_scheduler
    scheduler.last_epoch, scheduler._step_count = saved["last_epoch"], saved["_step_count"]
    lrs = [saved["_last_lr"][0]] * len(engine.optimizer.param_groups)
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    counters = run_state["counters"]
    engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]


def _restore_rng(saved: list[dict[str, Any] | None], seed: int, step: int) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank < len(saved) and saved[rank] is not None:
        set_rng_state(saved[rank])
        return
    derived = seed + 1_000_003 * step + rank
    random.seed(derived)
    np.random.seed(derived % 2 ** 32)
    torch.manual_seed(derived)
