"""The DeepSpeed side of a run: the process group, the model built for the plan's layout, the engine around it.

    dist = start_distributed(plan)           # every rank: its rank, the world size, its device
    model, report = build_model(plan, dist)  # ZeRO-3 under zero.Init; this rank's experts; --init-from weights
    engine = build_engine(plan, model)       # AdamW groups, the learning-rate schedule, the fp32 fixes

The benchmarks (`launch/bench_train.py`, `launch/bench_sft.py`) build their engines with `build_engine` from a plan
too, so they time the step that training runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gpt_moe.checkpoint.loading import every_rank_writes, load_weights, open_weights
from gpt_moe.checkpoint.weights import check_weights
from gpt_moe.errors import CheckpointError, ConfigError, GptMoeError, first_line
from gpt_moe.model.model import DeepSeekForCausalLM, mtp_prefix
from gpt_moe.model.moe import MoE
from gpt_moe.train.config import DIST_TIMEOUT_S, JOIN_TIMEOUT_S, lr_at
from gpt_moe.train.hardware import (MemoryWindow, deepspeed_cuda_arch_list, keep_freed_memory, release_freed_memory,
                                    unlink_cpu_allreduce_buffer)
from gpt_moe.train.join import join_all_ranks
from gpt_moe.train.plan import RunPlan
from gpt_moe.train.zero_memory import share_fp32_master

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def on_ranks(self, here: bool, work: Callable[[], T]) -> T | None:
        """`work()` on the ranks where `here` is true (None elsewhere); when it raises a one-line error on any of
        them, every rank raises it (the lowest rank's)."""
        result, error = None, None
        if here:
            try:
                result = work()
            except GptMoeError as err:
                error = err
        self.raise_any(error)
        return result

    def raise_any(self, error: GptMoeError | None) -> None:
        """Every rank raises the one-line error of the lowest rank that has one (`error`: this rank's, or None)."""
        first = next((err for err in self.gather(error) if err is not None), None)
        if first is not None:
            raise first

    def gather(self, value: T) -> list[T]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        values: list[T] = [value] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_rank0(self, value: T) -> T:
        """Rank 0's `value` (picklable) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """`values` summed (or `op`) over every rank, on this rank's device."""
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values


@dataclass(frozen=True)
class InitReport:
    """What `--init-from` cost this rank: bytes read from the weight files (the routed experts' part), tensors,
    seconds, and the memory of building and loading the model (`MemoryWindow`: the resident set before, and its peak
    during; GiB, None where unknown)."""

    rank: int
    bytes_read: int
    expert_bytes_read: int
    tensors: int
    seconds: float
    memory_before_gib: float | None
    memory_peak_gib: float | None
    process_peak_before_gib: float | None = None  # the process's peak before the window (see MemoryWindow)

    def describe(self) -> str:
        memory = "" if self.memory_peak_gib is None else (
            f", memory {self.memory_before_gib:.3f} -> peak {self.memory_peak_gib:.3f} GiB")
        return (f"rank {self.rank} read {self.bytes_read / 2 ** 20:.1f} MiB ({self.expert_bytes_read / 2 ** 20:.1f} "
                f"MiB of routed experts, {self.tensors} tensors) in {self.seconds:.1f}s{memory}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_single_process_env() -> None:
    """What the deepspeed launcher sets, for a one-rank run started with plain `python`."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def start_distributed(zero_stage: int, timeout_s: float = DIST_TIMEOUT_S,
                      join_timeout_s: float = JOIN_TIMEOUT_S) -> Distributed:
    """Joins the process group on DeepSpeed's accelerator (gloo on CPU, NCCL on GPUs) and prepares the process:
    on CPU the memory allocator (see `gpt_moe.train.hardware`), on CUDA the architecture list DeepSpeed's op builder
    reads. Rank, world size and local rank come from the environment any launcher sets (the deepspeed launcher,
    with or without ssh, and torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); this rank's device
    is the one of its local rank. Every rank joins first (`gpt_moe.train.join`): a rank missing after
    `join_timeout_s` seconds (its node never started it) ends the run naming it. A collective that waits longer than
    `timeout_s` seconds for another rank (one frozen or lost) raises instead of hanging."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ensure_single_process_env()
    accelerator = get_accelerator()
    accelerator.set_device(int(os.environ["LOCAL_RANK"]))  # torchrun passes no --local_rank, only the variable
    joined = join_all_ranks(join_timeout_s)  # kept until torch's rendezvous below shares rank 0's server
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(),
                               timeout=timedelta(seconds=timeout_s))
    del joined
    bound_later_groups(timedelta(seconds=timeout_s))
    context = Distributed(dist.get_rank(), dist.get_world_size(), torch.device(accelerator.current_device_name()))
    if context.device.type == "cpu" and zero_stage < 3:
        # reuse freed activations instead of faulting fresh pages in every step; not under ZeRO-3, the stage
        # for models that barely fit: the heap it keeps grew a `small` EP=2 rank past 10 GiB (killed) where it
        # peaks at 7.7 GiB with glibc's defaults
        keep_freed_memory()
    if context.device.type == "cpu":
        dist.barrier()  # every rank has mapped every rank's allreduce workspace: its name can go
        unlink_cpu_allreduce_buffer(context.rank)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if context.device.type == "cuda" and deepspeed_cuda_arch_list(arch_list) != arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_cuda_arch_list(arch_list)  # before FusedAdam is built
        log.warning("TORCH_CUDA_ARCH_LIST=%s rewritten as %s for DeepSpeed's op builder", arch_list,
                    os.environ["TORCH_CUDA_ARCH_LIST"])
    return context


def bound_later_groups(timeout: timedelta) -> None:
    """torch gives a group made by `new_group` (DeepSpeed's ZeRO data-parallel and expert groups: the gradient
    all-reduce runs in one) its backend's default timeout, 30 minutes for gloo, not the world group's: measured, a
    survivor of a frozen node waited in the ZeRO bucket all-reduce past a 20 s --dist-timeout. Every group made
    from now on gets `timeout` too (torch reads these module defaults when it makes one)."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def lost_rank_reason(err: BaseException) -> str | None:
    """What a collective's failure says when another rank stopped answering (reset connection, timeout: gloo's
    RuntimeError, NCCL's DistBackendError), as its first line; None for any other error."""
    text = first_line(err, limit=2000)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and ("gloo" in text or "NCCL" in text))):
        return None
    text = re.sub(r"^\[[^\]]*\] ", "", text)  # gloo's "[.../pair.cc:537] " source location
    return text.split(". ")[0].rstrip(".")[:200]


def check_same_precision(plan: RunPlan, context: Distributed) -> None:
    """Every rank decided bf16 "auto" the same way (each host measures for itself: `gpt_moe.train.dtype_choice`)."""
    votes = int(context.all_reduce(torch.tensor([int(plan.bf16)])).item())
    if votes not in (0, context.world):
        raise ConfigError(f"bf16 \"auto\" chose bf16 on {votes} of {context.world} ranks and fp32 on the others "
                          "(the hosts measured differently); set bf16.enabled to true or false in "
                          f"{plan.train.deepspeed_config}")


def end_distributed() -> None:
    """Takes this rank's process group down (idempotent). Leaving it to interpreter exit can abort the process
    ("terminate called without an active exception", exit 134) while gloo's communication threads are still
    alive: after an error, every rank must end it itself, without waiting for the others."""
    if dist.is_initialized():
        dist.destroy_process_group()


def build_model(plan: RunPlan, context: Distributed) -> tuple[DeepSeekForCausalLM, InitReport | None]:
    """The model of the plan on this rank: under ZeRO-3 built already partitioned (`deepspeed.zero.Init`: a rank
    never holds the whole model), with this rank's share of the routed experts under expert parallelism, the
    `--init-from` weights (each rank reading only what it holds; with what that cost), activation checkpointing and
    `--freeze-router`."""
    import deepspeed

    from gpt_moe.train.expert_parallel import setup_expert_parallel

    expert_parallel = setup_expert_parallel(plan.train.ep_size, plan.zero_stage) if plan.train.ep_size > 1 else None
    partitioned = plan.zero_stage == 3
    window = MemoryWindow(context.device)
    with deepspeed.zero.Init(config_dict_or_path=plan.ds_config, enabled=partitioned):
        # --init-from: no initialisation, the weights are read over it (a block they lack is seeded below)
        model = DeepSeekForCausalLM(plan.model, expert_parallel, seed=plan.train.seed if plan.init_from is None
                                    else None)
    if partitioned and context.device.type == "cpu":
        release_freed_memory()  # the whole parameters zero.Init replaced by partitions (small: 3.5 -> 1.9 GiB)
    report = load_init_weights(model, plan, context, window) if plan.init_from is not None else None
    model.set_activation_checkpointing(plan.train.activation_checkpointing)
    if plan.train.compile:
        model.compile_layers()
    if plan.train.freeze_router:
        for _, moe in model.moe_layers():
            moe.gate.weight.requires_grad_(False)  # the bias is a buffer: the balancing update leaves it alone
    if plan.zero_stage == 3:
        deepspeed.utils.set_z3_leaf_modules(model, [MoE])  # fetch a whole MoE block at once
    return model, report


def load_init_weights(model: DeepSeekForCausalLM, plan: RunPlan, context: Distributed,
                      window: MemoryWindow | None = None) -> InitReport:
    """--init-from: the weights, checked (headers, then every tensor finite), each rank reading only what it holds
    (its routed experts; under ZeRO-3 one module at a time, read by the rank that broadcasts it), in fp32. A source
    without the MTP block leaves a fresh one (seeded as a new run's). Refused on every rank alike, before the engine
    is built, when any rank found a problem. The report (bytes read, memory) goes to every rank's log and to
    summary.json (`init_from`)."""
    base = plan.init_from
    source = open_weights(base)
    has_mtp = check_weights(source, plan.model)
    if plan.model.num_nextn_predict_layers and not has_mtp:
        model.init_weights(plan.train.seed, prefix=mtp_prefix(plan.model))
        if context.is_rank0:
            log.warning("%s has no MTP block: it starts from a fresh initialisation", base.path)
    gathered = _zero3_gathered if plan.zero_stage == 3 else every_rank_writes
    started = time.perf_counter()
    problem = load_weights(model, source, gathered)
    problems: list[str | None] = [None] * context.world
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise CheckpointError(first)
    before, peak = window.read() if window else (None, None)
    report = InitReport(context.rank, source.stats.bytes, source.stats.expert_bytes, source.stats.tensors,
                        time.perf_counter() - started, before, peak, window.peak_before_gib if window else None)
    log.warning("--init-from %s (%s): %s", base.path, base.kind, report.describe())
    return report


@contextlib.contextmanager
def _zero3_gathered(params: list[torch.nn.Parameter]) -> Iterator[bool]:
    """ZeRO-3: the module's parameters whole on every rank of their group while inside; the group's first rank
    (the one `GatheredParameters(modifier_rank=0)` broadcasts from on exit) is the one that reads and writes them."""
    import deepspeed

    group = getattr(params[0], "ds_process_group", None)
    writer = 0 if group is None or group == dist.group.WORLD else dist.get_global_rank(group, 0)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield dist.get_rank() == writer


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with the unique names DeepSpeed's MoE splitting needs; no decay on 1-D parameters (by their
    full shape: a parameter partitioned by `deepspeed.zero.Init` holds an empty 1-D tensor)."""
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_engine(plan: RunPlan, model: torch.nn.Module):
    """DeepSpeed's engine around `model` with the plan's resolved config, AdamW groups and learning-rate schedule;
    non-finite steps are skipped in fp32 too, and ZeRO-3 fp32 masters share the parameters' memory."""
    import deepspeed

    cfg = plan.train
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.weight_decay), config=plan.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)))
    if not plan.bf16:
        share_fp32_master(engine.optimizer)  # ZeRO-3 fp32: the master weights are the parameters
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True  # skip non-finite steps in fp32 runs too
    return engine
