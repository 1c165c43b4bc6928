"""Expert parallelism: routed experts sharded over groups of `ep_size` ranks, dropless all-to-all dispatch.

Rank r of an expert-parallel group holds experts [r*E/ep, (r+1)*E/ep) of every MoE layer.
A forward pass, after routing and sorting the token-expert rows by expert:

1. exchange the per-expert row counts (an all-to-all of ep x E/ep integers),
2. send each rank the rows for its experts (variable-size `all_to_all_single`, differentiable),
3. group the received rows by local expert and run the grouped matmuls,
4. send the outputs back the same way.

Dropless means the split sizes vary per step, so step 1 costs one host sync per layer.

How DeepSpeed learns about the experts (chosen by experiment on DeepSpeed 0.19.8, 2 and 4
CPU ranks, every parameter and the clipped gradient norm compared with a single process
holding all experts):

* ZeRO-1/2: the experts module also inherits `deepspeed.moe.layer.MoE` (its constructor is
  not run) and its parameters carry `allreduce=False` and `group_name`. The engine then
  reduces expert gradients over the expert-data-parallel group only, divides by the full
  data-parallel size (the all-to-all backward already brought every token's gradient to
  the expert's owner, so that is the global mean), folds expert norms into the global
  clipping norm, and writes one `layer_L_expert_E_*.pt` file per global expert.
  Its checkpoint code expects one module per expert, so `state_dict()` called bare (only
  DeepSpeed's saver calls it so) returns per-expert keys, and loading stacks them back.
* ZeRO-3 refuses DeepSpeed's native MoE, so there the experts are plain modules whose
  parameters carry the attributes DeepSpeed's AutoEP gives its experts: `allreduce=False` and
  `group_name` (so the engine's start-up broadcast stays within the expert-data-parallel group
  instead of copying rank 0's experts everywhere) and the `ds_zero_*` placement ones (ZeRO-3
  partitions them over the expert-data-parallel group and includes them in the norm).
* AutoEP (`"expert_parallel"` in the DeepSpeed JSON) also keeps the routing exact, but it
  replaces our MoE block: parameter names change, the sequence-wise balance loss and the
  per-expert load that drives our bias update disappear. So we do not use it.
* Unregistered expert shards are silently wrong: the engine broadcasts rank 0's
  parameters at start, overwriting the other ranks' experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups

from gpt_moe.checkpoint.deepspeed_files import expert_key
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.moe import EXPERT_WEIGHTS, CombineRows, Experts, GatherSorted


class AllToAll(torch.autograd.Function):
    """Variable-size all-to-all along dim 0; the backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.group = (send_sizes, recv_sizes), group
        out = x.new_empty((sum(recv_sizes),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_sizes,
                               input_split_sizes=send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_sizes, recv_sizes = ctx.sizes
        out = grad.new_empty((sum(send_sizes),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=send_sizes,
                               input_split_sizes=recv_sizes, group=ctx.group)
        return out, None, None, None


class DeepSpeedExperts(Experts, DeepSpeedMoE):
    """Experts that DeepSpeed's ZeRO-1/2 engine treats as one of its own MoE layers."""

    def __init__(self, config: ModelConfig, num_local_experts: int, first_expert: int, group_name: str,
                 ep_size: int) -> None:
        Experts.__init__(self, config, num_local_experts, first_expert)
        self.num_experts, self.ep_size, self.expert_group_name = config.n_routed_experts, ep_size, group_name
        for weight in EXPERT_WEIGHTS:
            getattr(self, weight).allreduce = False  # deepspeed.moe.utils.is_moe_param
            getattr(self, weight).group_name = group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine; the groups already exist (see `setup_expert_parallel`)."""

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if destination is None and prefix == "" and not args:  # DeepSpeed's _save_moe_checkpoint
            return {expert_key("", j, name): getattr(self, name)[j].detach()
                    for name in EXPERT_WEIGHTS for j in range(self.num_local_experts)}
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *rest) -> None:
        for name in EXPERT_WEIGHTS:
            keys = [expert_key(prefix, j, name) for j in range(self.num_local_experts)]
            if all(k in state_dict for k in keys):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *rest)


@dataclass
class ExpertParallel:
    """This rank's place in its expert-parallel group (`group` is a torch.distributed process group)."""

    size: int
    rank: int
    group: object
    group_name: str
    zero_stage: int

    def build_experts(self, config: ModelConfig) -> Experts:
        """This rank's share of the routed experts, registered with DeepSpeed for the ZeRO stage."""
        local = config.n_routed_experts // self.size
        first = self.rank * local
        if self.zero_stage < 3:
            return DeepSpeedExperts(config, local, first, self.group_name, self.size)
        # as AutoEP marks its experts: without allreduce/group_name the engine's start-up broadcast
        # copies rank 0's experts over every other rank's (seen: experts 8-15 started as 0-7); set in the
        # constructor so that `deepspeed.zero.Init` partitions them over the expert-data-parallel group
        return Experts(config, local, first, param_attributes={
            "allreduce": False, "group_name": self.group_name, "ds_zero_placement_family": "autoep_expert",
            "ds_zero_partition_group_name": self.group_name,
            "ds_zero_partition_process_group": groups._get_expert_data_parallel_group(self.group_name)})

    @torch.compiler.disable  # the split sizes are read on the host: runs eagerly between compiled parts
    def run_experts(self, experts: Experts, rows: torch.Tensor, counts: torch.Tensor,
                    row_weights: torch.Tensor) -> torch.Tensor:
        """rows: [n, hidden] sorted by global expert; counts: [E] rows per global expert;
        row_weights: [n, 1] -> weighted expert outputs for the same rows [n, hidden]."""
        local = experts.num_local_experts
        send = counts.to(torch.int64).view(self.size, local)  # send[r, j]: my rows for rank r's expert j
        recv = torch.empty_like(send)  # recv[r, j]: rank r's rows for my expert j
        dist.all_to_all_single(recv.view(-1), send.reshape(-1), group=self.group)
        send_sizes, recv_sizes = send.sum(1).tolist(), recv.sum(1).tolist()

        received = AllToAll.apply(rows, send_sizes, recv_sizes, self.group)  # ordered (source rank, expert)
        received_w = AllToAll.apply(row_weights, send_sizes, recv_sizes, self.group)
        expert_of_row = torch.arange(local, device=rows.device).repeat(self.size).repeat_interleave(recv.flatten())
        order = expert_of_row.argsort(stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        out = experts(GatherSorted.apply(received, order, rank, 1), recv.sum(0),
                      GatherSorted.apply(received_w, order, rank, 1))
        return AllToAll.apply(CombineRows.apply(out, rank, order, 1), recv_sizes, send_sizes, self.group)


def setup_expert_parallel(ep_size: int, zero_stage: int, data_before_expert: bool = False) -> ExpertParallel:
    """Creates DeepSpeed's expert-parallel and expert-data-parallel groups (after init_distributed,
    before the model is built, so each rank knows which experts it holds)."""
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, use_data_before_expert_parallel_=data_before_expert)
    return ExpertParallel(size=ep_size, rank=groups._get_expert_parallel_rank(name),
                          group=groups._get_expert_parallel_group(name), group_name=name, zero_stage=zero_stage)
