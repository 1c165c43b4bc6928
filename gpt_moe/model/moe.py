"""DeepSeekMoE: shared experts + fine-grained routed experts, dropless, with aux-loss-free balancing.

Routing (DeepSeek-V3 sec. 2.1.2): scores s = sigmoid(x W_r^T) (or softmax for V2-style
models). Experts are *selected* on s + b, where b is the per-expert
`e_score_correction_bias`, optionally restricted to the best `topk_group` of `n_group`
expert groups; the *mixing weights* are the unbiased scores of the chosen experts,
renormalised over the top-k and multiplied by `routed_scaling_factor`. The bias is not
trained by gradients: after each optimizer step it moves by `rate * sign(mean_load -
load_i)` (`update_bias`), which balances load without an auxiliary loss. An optional
sequence-wise balance loss (V3 eq. 17-20) can be added with a small coefficient.

Dispatch: the [tokens, top_k] assignments are sorted by expert, the tokens are gathered
in that order, and all local experts run as two grouped matmuls (`torch._grouped_mm`)
over contiguous row blocks; the outputs are un-permuted and mixed. No Python loop over
experts, no host sync, no one-hot dispatch tensor. When expert parallelism is on, the
sorted rows travel to the rank holding their expert and back (`expert_parallel.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.recompute import Recomputable, checkpointed

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
"""The routed experts' stacked weights ([experts, 2 * moe_intermediate, hidden] and [experts, hidden,
moe_intermediate]), named as in transformers' DeepseekV3 grouped experts."""


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). x: [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    checkpoint_activations = False  # selective checkpointing: recompute the SwiGLU in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training:
            return checkpointed(self, self._swiglu, x)
        return self._swiglu(x)

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopkRouter(nn.Module):
    """Scores every routed expert and picks `num_experts_per_tok` per token (module name `gate` in HF)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        # fp32 whatever the model dtype: updates of size 1e-3 must not round away in bf16
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] -> (expert ids [tokens, k] int64, mixing weights [tokens, k] fp32,
        scores [tokens, experts] fp32, logits [tokens, experts] fp32). Given expert_ids (a recomputation
        replaying its first pass), the selection is skipped and those experts are used."""
        config = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if config.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if expert_ids is None:
            choice = scores.detach() + self.e_score_correction_bias
            if config.n_group > 1:
                choice = self._keep_top_groups(choice)
            expert_ids = choice.topk(config.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, weights * config.routed_scaling_factor, scores, logits

    def _keep_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Masks (to -inf) every expert outside the `topk_group` best groups of each token.

        A group's score is the sum of its two best experts for sigmoid routing (V3) and its
        best expert for softmax routing (V2's group-limited greedy)."""
        config = self.config
        grouped = choice.view(choice.shape[0], config.n_group, config.experts_per_group)
        if config.scoring_func == "sigmoid":
            group_score = grouped.topk(min(2, config.experts_per_group), dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        top_groups = group_score.topk(config.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block i of x (rows offsets[i-1]:offsets[i]) times weight[i].

    x: [rows, in]; weight: [experts, in, out]; offsets: [experts] int32 cumulative row counts
    -> [rows, out]. One `torch._grouped_mm` where the kernel exists for this device and dtype;
    otherwise a loop over `weight.unbind(0)` (slices taken once, so backward writes one
    gradient buffer instead of a full-size one per expert).
    """
    if _has_grouped_mm(x, weight):
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            return grouped_mm_fp32(x, weight, offsets)
        return torch._grouped_mm(x, weight, offs=offsets)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    blocks = [x[s:e] @ w for s, e, w in zip(starts, ends, weight.unbind(0))]
    return torch.cat(blocks) if blocks else x.new_zeros(0, weight.shape[-1])


def _has_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm has a kernel for these operands: CPU (fp32/bf16) or CUDA sm80+ in bf16,
    with every non-unit stride a multiple of 16 bytes (the kernels' alignment rule)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in (x, weight):
        if any(stride != 1 and (stride * t.element_size()) % 16 for stride in t.stride()):
            return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


@torch.library.custom_op("gpt_moe::grouped_mm_fp32", mutates_args=())
def grouped_mm_fp32(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` as an operator `torch.compile` treats as opaque: torch's shape function for it accepts
    only bf16 (torch 2.13), while its CPU kernel also multiplies fp32. x: [rows, in], weight: [experts, in, out]
    -> [rows, out]; or, as the weight gradient needs, x: [in, rows], weight: [rows, out] -> [experts, in, out]."""
    return torch._grouped_mm(x, weight, offs=offsets)


@grouped_mm_fp32.register_fake
def _grouped_mm_fp32_shape(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 3:
        return x.new_empty(x.shape[0], weight.shape[-1])
    return x.new_empty(offsets.shape[0], x.shape[0], weight.shape[-1])


def _grouped_mm_fp32_setup(ctx, inputs, output) -> None:
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _grouped_mm_fp32_backward(ctx, grad: torch.Tensor):
    """The forward's two products transposed: dx = grad . W_e^T per row block, dW_e = x_e^T . grad_e."""
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # an expanded gradient (stride 0) breaks the kernel's stride rule
    grad_x = grouped_mm_fp32(grad, weight.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_fp32(x.t(), grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm_fp32.register_autograd(_grouped_mm_fp32_backward, setup_context=_grouped_mm_fp32_setup)


CPU_BF16_ROW_MULTIPLE = 64
"""Row blocks of this many rows per expert for bf16 grouped matmuls on CPU (see `expert_row_multiple`)."""


def expert_row_multiple(x: torch.Tensor) -> int:
    """The multiple each expert's row count is padded to before the grouped matmuls: 64 for bf16 on CPU, else 1.

    oneDNN builds a bf16 kernel for every new matrix shape, and in training each expert's row count changes every
    step: with the counts varying, the grouped matmuls forward and backward took 2.3x as long as with one fixed set
    of counts (29 against 13 ms, 16 experts x 256 rows of 256, one thread of an AMD EPYC). Padded to multiples of
    64, the shapes recur and their kernels are cached: 15 ms, the zero rows' extra work included. fp32 (BLAS) has
    no per-shape cost, and under `torch.compile` the shapes must not depend on the data: neither is padded. Only
    training pads (`Experts.forward`): decoding a token routes a few rows, which 64-row blocks would multiply."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.compiler.is_compiling():
        return CPU_BF16_ROW_MULTIPLE
    return 1


def padded_places(counts: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows sorted by expert, counts [E] rows per expert: (the place of each row once every expert's block is
    padded to a multiple of `multiple` rows [rows], the padded counts [E])."""
    padded = (counts + multiple - 1) // multiple * multiple
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # block start, padded minus unpadded
    places = torch.arange(int(counts.sum()), device=counts.device) + shift.repeat_interleave(counts)
    return places, padded


class Experts(nn.Module, Recomputable):
    """The routed experts held by this rank, stacked: gate_up_proj [E_local, 2*I, hidden] (gate rows
    first), down_proj [E_local, hidden, I] -- the layout of transformers' `DeepseekV3Experts`.
    `rows_since_log` (fp32 scalar) counts the token rows they processed in training forwards, from every
    rank of the expert-parallel group (the trainer reads and resets it at each log: the EP skew)."""

    def __init__(self, config: ModelConfig, num_local_experts: int, first_expert: int = 0,
                 param_attributes: dict[str, object] | None = None) -> None:
        """param_attributes: set on both weights inside the constructor, where `deepspeed.zero.Init` (which
        partitions a module's parameters as its constructor returns) sees them (see expert_parallel.py)."""
        # nn.Module.__init__ rather than super(): the DeepSpeed-visible subclass also inherits
        # deepspeed.moe.layer.MoE, whose constructor must not run (see expert_parallel.py)
        nn.Module.__init__(self)
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert  # global id of local expert 0
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_local_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local_experts, hidden, inter))
        for name, value in (param_attributes or {}).items():
            for weight in EXPERT_WEIGHTS:
                setattr(getattr(self, weight), name, value)
        self.register_buffer("rows_since_log", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        """x: [rows, hidden] sorted by local expert; counts: [E_local] rows per expert;
        row_weights: [rows, 1] mixing weight of each row -> weighted expert outputs [rows, hidden].

        The weight scales the activation before the down projection (linear, so the same result),
        which is cheaper than scaling the output when moe_intermediate_size < hidden_size."""
        self._count_rows(counts)
        multiple = expert_row_multiple(x) if self.training else 1
        if multiple > 1:  # each expert's block padded with zero rows: see `expert_row_multiple`
            places, counts = padded_places(counts, multiple)
            rows = int(counts.sum())
            x = x.new_zeros(rows, x.shape[1]).index_copy(0, places, x)
            row_weights = row_weights.new_zeros(rows, 1).index_copy(0, places, row_weights)
        offsets = counts.cumsum(0).to(torch.int32)
        if self.checkpoint_activations and self.training:
            out = checkpointed(self, self._swiglu, x, offsets, row_weights)
        else:
            out = self._swiglu(x, offsets, row_weights)
        return out if multiple == 1 else out.index_select(0, places)

    checkpoint_activations = False  # selective checkpointing: recompute the grouped SwiGLU in backward

    @torch.compiler.disable  # eager under --compile: see `MoE.route`
    def _count_rows(self, counts: torch.Tensor) -> None:
        if self.training and not self.recomputing:
            self.rows_since_log += counts.sum()

    def _swiglu(self, x: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
        gate_up = grouped_matmul(x, self.gate_up_proj.transpose(1, 2), offsets)
        hidden = weighted_swiglu(gate_up, row_weights.to(x.dtype))
        return grouped_matmul(hidden, self.down_proj.transpose(1, 2), offsets)


def weighted_swiglu(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * weight for gate_up = [gate | up]: [rows, 2*I], weight: [rows, 1] -> [rows, I]. Eager runs
    `WeightedSwiGLU`; under `torch.compile` the plain expression, which inductor fuses (forward and backward) and
    whose saved tensors it chooses itself."""
    if torch.compiler.is_compiling():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up * weight
    return WeightedSwiGLU.apply(gate_up, weight)


class WeightedSwiGLU(torch.autograd.Function):
    """hidden = silu(gate) * up * weight, for gate_up = [gate | up]: [rows, 2*I] and weight: [rows, 1].

    Autograd of the three elementwise ops keeps two [rows, I] intermediates besides the input
    (silu(gate) and silu(gate) * up) and, in backward, concatenates the gate and up gradients into
    a fresh [rows, 2*I] tensor. This keeps only the input, recomputes silu(gate), and writes both
    gradient halves in place."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, weight)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        grad_act_up = grad * up  # d out / d (silu(gate) * weight)
        grad_weight = torch.linalg.vecdot(grad_act_up, act).unsqueeze(-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad_act_up.mul_(weight), gate, grad_input=grad_gate)
        torch.mul(grad, act.mul_(weight), out=grad_up)
        return grad_gate_up, grad_weight


class ExpertParallelism(Protocol):
    """Where the routed experts live when they are sharded over ranks (the trainer's `ExpertParallel` implements
    it over DeepSpeed's process groups; the model only calls these two methods)."""

    def build_experts(self, config: ModelConfig) -> Experts:
        """This rank's share of the routed experts."""

    def run_experts(self, experts: Experts, rows: torch.Tensor, counts: torch.Tensor,
                    row_weights: torch.Tensor) -> torch.Tensor:
        """rows: [n, hidden] sorted by global expert; counts: [E] rows per global expert; row_weights: [n, 1] ->
        the weighted expert outputs of the same rows [n, hidden] (computed wherever each expert lives)."""


class MoE(nn.Module, Recomputable):
    """DeepSeekMoE feed-forward. x: [batch, seq, hidden] -> ([batch, seq, hidden], router losses).

    The router losses are a dict, empty unless training with a positive coefficient: "aux" the
    sequence-wise balance loss, "z" the router z-loss (both already weighted).

    After each forward, `tokens_per_expert` ([n_routed_experts] fp32) holds the routed
    assignments of that forward (and `last_expert_ids` [batch, seq, k] when `record_routing`) and
    `load_since_update` their running sum, which the trainer all-reduces and feeds to `update_bias`
    once per optimizer step. Training forwards also add to `routing_since_log` ([2] fp32: the sum
    over tokens of `router_entropy`, the number of tokens), which the trainer reads and resets at
    each log (device tensors: no host sync per step).
    """

    def __init__(self, config: ModelConfig, expert_parallel: ExpertParallelism | None = None) -> None:
        super().__init__()
        self.config = config
        self.expert_parallel = expert_parallel
        self.gate = TopkRouter(config)
        if expert_parallel is None:
            self.experts = Experts(config, config.n_routed_experts)
        else:
            self.experts = expert_parallel.build_experts(config)
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        n = config.n_routed_experts
        self.record_routing = False  # when True, forward keeps `last_expert_ids` (the chat app's routing view)
        self.save_routing = False  # full checkpointing: keep `saved_expert_ids` [tokens, k] for the recomputation
        self.saved_expert_ids: torch.Tensor | None = None
        self.last_expert_ids: torch.Tensor | None = None
        self.register_buffer("tokens_per_expert", torch.zeros(n), persistent=False)
        self.register_buffer("load_since_update", torch.zeros(n), persistent=False)
        self.register_buffer("routing_since_log", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, s, h = x.shape
        k = self.config.num_experts_per_tok
        flat = x.reshape(b * s, h)
        expert_ids, weights, scores, logits = self.route(flat, b, s)
        assignments = expert_ids.flatten()  # [tokens*k]; assignment j belongs to token j // k
        counts = torch.zeros(self.config.n_routed_experts, device=x.device).index_add_(
            0, assignments, torch.ones_like(assignments, dtype=torch.float32))
        order = assignments.argsort(stable=True)  # sorted row r is assignment order[r]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)  # assignment j is sorted row rank[j]
        rows = GatherSorted.apply(flat, order, rank, k)  # [tokens*k, hidden], grouped by expert
        row_weights = weights.flatten()[order].unsqueeze(-1)
        if self.expert_parallel is not None:
            out_rows = self.expert_parallel.run_experts(self.experts, rows, counts, row_weights)
        else:
            out_rows = self.experts(rows, counts.long(), row_weights)
        out = CombineRows.apply(out_rows, rank, order, k).view(b, s, h)
        if self.config.n_shared_experts:
            out = out + self.shared_experts(x)
        self.count(counts, scores)
        return out, self.router_losses(scores, expert_ids, logits, b, s)

    # `route` and `count` read and write this module's state (the routing a recomputation replays, the counters it
    # must not add to twice): under --compile they run eagerly between compiled parts, so the compiled graphs never
    # depend on that state and a recomputation runs the very graphs (and saves the tensors) its first pass ran.
    @torch.compiler.disable
    def route(self, flat: torch.Tensor, b: int, s: int) -> tuple[torch.Tensor, ...]:
        """The router on flat: [b*s, hidden] (`TopkRouter.forward`), replaying the first pass's choice when
        recomputing under full checkpointing."""
        replay = self.saved_expert_ids if self.recomputing else None
        expert_ids, weights, scores, logits = self.gate(flat, replay)
        if self.save_routing and self.training and not self.recomputing:
            self.saved_expert_ids = expert_ids  # full checkpointing: the recomputation replays this routing
        if self.record_routing:
            self.last_expert_ids = expert_ids.view(b, s, -1).detach()  # [batch, seq, k] global expert ids
        return expert_ids, weights, scores, logits

    @torch.compiler.disable
    @torch.no_grad()
    def count(self, counts: torch.Tensor, scores: torch.Tensor) -> None:
        """This forward's routed assignments per expert (counts: [experts]) into the balancing and health counters;
        a recomputation counts nothing twice. scores: [tokens, experts]."""
        self.tokens_per_expert.copy_(counts)
        if self.training and not self.recomputing:
            self.load_since_update += counts
            self.routing_since_log[0] += router_entropy(scores).sum()
            self.routing_since_log[1] += scores.shape[0]

    def router_losses(self, scores: torch.Tensor, expert_ids: torch.Tensor, logits: torch.Tensor, b: int,
                      s: int) -> dict[str, torch.Tensor]:
        """The weighted training losses on the router whose coefficient is positive (none when evaluating).
        scores, logits: [b*s, experts]; expert_ids: [b*s, k]."""
        config, losses = self.config, {}
        if self.training and config.seq_aux_loss_coef > 0:
            losses["aux"] = self.sequence_balance_loss(scores.view(b, s, -1), expert_ids.view(b, -1))
        if self.training and config.router_z_loss_coef > 0:
            losses["z"] = config.router_z_loss_coef * router_z_loss(logits)
        return losses

    def sequence_balance_loss(self, scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

        scores: [batch, seq, experts] fp32; expert_ids: [batch, seq*k]. f_i is expert i's share of
        the sequence's assignments times E/k (1 when uniform); P_i its mean normalised score.
        """
        b, s, n = scores.shape
        k = self.config.num_experts_per_tok
        chosen = torch.zeros(b, n, device=scores.device).scatter_add_(
            1, expert_ids, torch.ones_like(expert_ids, dtype=torch.float32))
        f = chosen * n / (k * s)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.config.seq_aux_loss_coef * (f * p).sum(dim=1).mean()


class GatherSorted(torch.autograd.Function):
    """rows = x[order // k]: each token copied once per chosen expert, in expert order.

    Autograd's own backward for this indexing is a scatter-add (slow on CPU, atomic on GPU);
    as `order` is a permutation of the token-expert pairs, the gradient is a gather by its
    inverse `rank` followed by a sum over each token's k rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, rank: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(rank)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rank,) = ctx.saved_tensors
        rows = grad.index_select(0, rank)
        return (rows.view(-1, ctx.k, grad.shape[-1]).sum(dim=1) if ctx.k > 1 else rows), None, None, None


class CombineRows(torch.autograd.Function):
    """out[t] = sum of token t's k rows: rows.index_select(0, rank) back in token-major order, summed over
    each token's k rows ([tokens*k, hidden] -> [tokens, hidden]). The transpose of GatherSorted: its
    backward is the single gather grad[order // k], with no [tokens*k, hidden] temporary."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, rank: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        unsorted = rows.index_select(0, rank)
        return unsorted.view(-1, k, rows.shape[-1]).sum(dim=1) if k > 1 else unsorted

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order // ctx.k), None, None, None


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5; Megatron-Core's `z_loss_func`): the mean over tokens of
    logsumexp(logits)^2, which keeps router logits small. logits: [tokens, experts] -> scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of each token's normalised scores p = s / sum(s), over log E (1: uniform over the experts,
    0: all weight on one). scores: [tokens, experts] (>= 0) -> [tokens]."""
    p = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(max(scores.shape[-1], 2))


@torch.no_grad()
def update_bias(router: TopkRouter, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing step: bias_i += rate * sign(mean(load) - load_i).

    load: [n_routed_experts] token counts summed over the whole global batch (all ranks,
    all micro-batches). Overloaded experts become less likely to be selected, underloaded
    ones more; mixing weights are untouched because they use unbiased scores."""
    bias = router.e_score_correction_bias
    bias += rate * torch.sign(load.float().mean() - load.float()).to(bias.device)


@contextlib.contextmanager
def recording_routing(layers: Sequence[tuple[int, MoE]]) -> Iterator[None]:
    """Turns `record_routing` on for the given MoE modules for the duration of the block: each forward keeps its
    `last_expert_ids` [batch, seq, k] (the app's routing view, the routing drift's loads)."""
    for _, moe in layers:
        moe.record_routing, moe.last_expert_ids = True, None
    try:
        yield
    finally:
        for _, moe in layers:
            moe.record_routing = False


def recorded_loads(layers: Sequence[tuple[int, MoE]], counted: torch.Tensor) -> torch.Tensor:
    """counted: [batch, seq] bool, the positions of the last recorded forward to count -> [layers, routed experts]
    int64 on the CPU: each layer's (token, slot) assignments per expert at those positions."""
    if not layers:
        return torch.zeros((0, 0), dtype=torch.int64)
    loads = []
    for _, moe in layers:
        chosen = moe.last_expert_ids[counted.to(moe.last_expert_ids.device)]  # [counted positions, k]
        loads.append(torch.bincount(chosen.flatten(), minlength=moe.config.n_routed_experts).cpu())
    return torch.stack(loads)
