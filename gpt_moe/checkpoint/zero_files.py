"""DeepSpeed's partitioned checkpoint files read parameter by parameter, without DeepSpeed's runtime.

A ZeRO checkpoint stores each parameter's fp32 master weight and Adam moments in pieces: every
rank writes its partition of each optimizer group as one flat tensor per state (`fp32`,
`exp_avg`, `exp_avg_sq`). `ZeroCheckpoint` finds, for each parameter, which slices of which
ranks' flat tensors hold it, and reads any range of its elements from memory-mapped files, so
that one parameter (or one expert) is in memory at a time, whatever the model's size.

* ZeRO-1/2: each rank's file records, per group, the (start, numel) fragment of every parameter
  that overlaps its partition (`param_slice_mappings`); a parameter's fragments on consecutive
  ranks of the group's partition ranks, in rank order, are the parameter.
* ZeRO-3: every parameter is split into equal zero-padded slices, one per partition rank, and a
  rank's flat tensor holds its slices of a sub-group's parameters one after the other (in the
  order of `param_shapes`); DeepSpeed records the partition ranks of each sub-group.

Under expert parallelism the routed experts are a separate group partitioned over the ranks
that hold the same experts (their expert-data-parallel group); COMPLETE's `expert_ranges` says
which experts each rank holds, so a stacked expert tensor is read per holder and its rows
are global expert ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt_moe.checkpoint.deepspeed_files import load_data_only
from gpt_moe.checkpoint.node_files import require_files
from gpt_moe.checkpoint.records import read_record
from gpt_moe.errors import CheckpointError

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of `rank`'s flat tensor of optimizer group `group`."""

    rank: int
    group: int
    start: int
    numel: int


@dataclass
class Parameter:
    """Where one parameter lives. `shape` is one holder's shape (for routed experts: the local stack
    [experts per rank, ...]); `holders` maps the first global expert a holder has (0 for an ordinary
    parameter, which has one holder) to its pieces, in element order."""

    name: str
    shape: torch.Size
    holders: dict[int, list[Piece]]

    @property
    def experts_per_holder(self) -> int:
        return self.shape[0]


class ZeroCheckpoint:
    """The fp32 master weights and Adam moments of a DeepSpeed ZeRO-1/2/3 checkpoint tag (`tag_dir`, with our
    COMPLETE record), one parameter or one expert at a time.

        ckpt = ZeroCheckpoint(tag_dir)
        for p in ckpt.parameters.values():
            ckpt.read(p, "exp_avg")             # whole tensor, experts stacked in global order
            ckpt.read_expert(p, 5, "fp32")      # one routed expert: [*shape[1:]]
    """

    def __init__(self, tag_dir: str | Path) -> None:
        self.tag_dir = Path(tag_dir)
        self.record = read_record(self.tag_dir)
        require_files(self.tag_dir, self.record)  # a checkpoint of node-local disks: gathered first
        self.world, self.stage = self.record.layout.world_size, self.record.layout.zero_stage
        self.models = self._model_files()
        self._optimizers: dict[int, dict[str, Any]] = {}
        find = self._zero3_parameters if self.stage == 3 else self._zero12_parameters
        self.parameters: dict[str, Parameter] = {p.name: p for p in find()}
        self.release()

    # ---------------------------------------------------------------- files
    def _model_files(self) -> list[dict[str, Any]]:
        """Rank 0's model-states file (ZeRO-1/2, the same for all ranks) or every rank's (ZeRO-3)."""
        if self.stage < 3:
            return [load_data_only(self.tag_dir / "mp_rank_00_model_states.pt", mmap=True)]
        return [load_data_only(self.tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", mmap=True)
                for rank in range(self.world)]

    def _optimizer_file(self, rank: int) -> dict[str, Any]:
        files = sorted(self.tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        if len(files) != 1:
            raise CheckpointError(f"{self.tag_dir}: expected one optimizer file for rank {rank} of {self.world} "
                                  f"(zero_pp_rank_{rank}_mp_rank_00_optim_states.pt), found {len(files)}")
        return load_data_only(files[0], mmap=True)["optimizer_state_dict"]

    def optimizer(self, rank: int) -> dict[str, Any]:
        """Rank `rank`'s optimizer state, memory-mapped: only the pages read are brought in."""
        if rank not in self._optimizers:
            self._optimizers[rank] = self._optimizer_file(rank)
        return self._optimizers[rank]

    def release(self) -> None:
        """Drops the mapped optimizer files (reopened on the next read), so that the pages read so far stop
        counting toward this process's memory; `gpt_moe.checkpoint.reshard` calls it after each parameter."""
        self._optimizers.clear()

    def _flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        optimizer = self.optimizer(rank)
        if key == "fp32":
            return optimizer["fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"][group]
        base = optimizer["optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"]
        return base["state"][group][key]

    @property
    def model_states(self) -> dict[str, Any]:
        """Rank 0's model-states file: module buffers, client state, lr scheduler, step counters."""
        return self.models[0]

    def adam_step(self) -> int:
        """The optimizer's step count (the same in every group; DeepSpeed skips a non-finite step entirely)."""
        base = self.optimizer(0)["optimizer_state_dict" if self.stage == 3 else "base_optimizer_state"]
        steps = {int(state["step"]) for state in base["state"].values() if "step" in state}
        if len(steps) != 1:
            raise CheckpointError(f"{self.tag_dir}: optimizer groups disagree on the step count ({sorted(steps)})")
        return steps.pop()

    # ---------------------------------------------------------------- where each parameter lives
    def _expert_holders(self) -> list[tuple[int, ...]]:
        """The groups of ranks holding the same routed experts, ordered by the first expert they hold."""
        ranges = self.record.expert_ranges or [None] * self.world
        by_range: dict[tuple, list[int]] = {}
        for rank, held in enumerate(ranges):
            by_range.setdefault(tuple(held or ()), []).append(rank)
        return [tuple(ranks) for _, ranks in sorted(by_range.items())]

    def _first_expert(self, ranks: tuple[int, ...]) -> int:
        ranges = self.record.expert_ranges
        return ranges[ranks[0]][0] if ranges and ranges[ranks[0]] else 0

    def _zero12_parameters(self) -> list[Parameter]:
        groups = self.optimizer(0)["base_optimizer_state"]["param_groups"]
        found = []
        for index, shapes in enumerate(self.model_states["param_shapes"]):
            moe = bool(groups[index].get("moe"))
            holder_sets = self._expert_holders() if moe else [tuple(range(self.world))]
            for name, shape in shapes.items():
                holders = {}
                for ranks in holder_sets:
                    maps = [self.optimizer(rank)["param_slice_mappings"][index] for rank in ranks]
                    holders[self._first_expert(ranks) if moe else 0] = [
                        Piece(rank, index, mapping[name].start, mapping[name].numel)
                        for rank, mapping in zip(ranks, maps) if name in mapping]
                found.append(Parameter(name, torch.Size(shape), holders))
        return found

    def _zero3_parameters(self) -> list[Parameter]:
        recorded = [self.optimizer(rank).get("ds_zero_partition_groups") for rank in range(self.world)]
        sizes = [flat.numel() for flat in self.optimizer(0)["fp32_flat_groups"]]

        def holder_sets(sub_group: int) -> list[tuple[int, ...]]:
            if not all(recorded):
                return [tuple(range(self.world))]
            return sorted({tuple(groups[sub_group]["partition_ranks"]) for groups in recorded})

        found, sub_group, used = [], 0, 0
        for shapes in self.model_states["param_shapes"]:
            for name, shape in shapes.items():
                holder_ranks = holder_sets(sub_group)
                numel = torch.Size(shape).numel()
                part = -(-numel // len(holder_ranks[0]))
                expert = len(holder_ranks) > 1
                holders = {self._first_expert(ranks) if expert else 0:
                           [Piece(rank, sub_group, used, part) for rank in ranks] for ranks in holder_ranks}
                found.append(Parameter(name, torch.Size(shape), holders))
                used += part
                if used == sizes[sub_group]:
                    sub_group, used = sub_group + 1, 0
        if sub_group != len(sizes) or used:
            raise CheckpointError(f"{self.tag_dir}: ZeRO-3 partitions do not match the recorded parameter shapes")
        return found

    # ---------------------------------------------------------------- reading
    def _read_range(self, pieces: list[Piece], key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the parameter made of `pieces` (1-D, a copy)."""
        out, offset = [], 0
        for piece in pieces:
            begin, end = max(lo, offset), min(hi, offset + piece.numel)
            if begin < end:
                start = piece.start + begin - offset
                out.append(self._flat(piece.rank, piece.group, key)[start: start + end - begin])
            offset += piece.numel
        if sum(t.numel() for t in out) != hi - lo:
            raise CheckpointError(f"{self.tag_dir}: the optimizer files hold {sum(t.numel() for t in out)} of "
                                  f"elements [{lo}, {hi}) of a parameter; the checkpoint is incomplete")
        return torch.cat(out).clone() if len(out) > 1 else out[0].clone()

    def read(self, param: Parameter, key: str) -> torch.Tensor:
        """The whole parameter's `key` state; routed experts stacked in global order: [n_experts, ...]."""
        parts = [self._read_range(pieces, key, 0, param.shape.numel()).view(param.shape)
                 for _, pieces in sorted(param.holders.items())]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def read_expert(self, param: Parameter, expert: int, key: str) -> torch.Tensor:
        """Global routed expert `expert`'s slice of a stacked expert parameter: [*shape[1:]]."""
        local = param.experts_per_holder
        first = expert - expert % local
        if first not in param.holders:
            raise CheckpointError(f"{self.tag_dir}: no rank holds expert {expert} of {param.name}")
        per_expert = param.shape[1:].numel()
        lo = (expert - first) * per_expert
        return self._read_range(param.holders[first], key, lo, lo + per_expert).view(param.shape[1:])
