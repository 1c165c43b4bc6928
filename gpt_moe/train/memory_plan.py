"""Per-rank training memory, estimated from the configs: model states per ZeRO stage and offload, activations per
checkpointing mode, the output head's chunks, and (on CPU) the process itself.

    estimate = training_memory(model, MemoryLayout(Layout(world_size=2, ep_size=1, zero_stage=2, bf16=False),
                                                   seq_len=256, micro_batch=16))
    estimate.total_gib, estimate.parts        # what one rank holds at its peak, and of what

Model states (bytes per parameter held by the rank; routed experts are first divided by the EP size, then
sharded over the expert-data-parallel ranks, everything else over all ranks):
  parameters 2 (bf16) or 4 (fp32), sharded by ZeRO-3;
  gradients the same, sharded by ZeRO-2 and 3;
  fp32 master 4 (ZeRO-1/2 always keep a copy; ZeRO-3 fp32 shares the parameters, see `gpt_moe.train.zero_memory`)
  and Adam's two moments 8, sharded by every stage; with optimizer offload they live in host memory (on a CPU the same
  memory);
  torch's Adam step allocates two temporaries of its largest tensor (the rank's flat partition, or a ZeRO-3
  sub-group).
Activations (bytes per token, counted from the tensors autograd saves in our modules, checked against
`torch.autograd.graph.saved_tensors_hooks` sums within 10% for tiny): `none` keeps every layer's; `full` keeps
each layer's input and, during the backward pass, one layer's activations at a time; `selective` drops the
SwiGLU intermediates (routed, shared and dense). The output head adds one chunk of logits (`gpt_moe.model.loss`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gpt_moe.checkpoint.records import Layout
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.loss import MIN_CHUNK_TOKENS
from gpt_moe.model.params import account, routed_expert_params

GIB = 1024 ** 3
CPU_PROCESS_GIB = 0.45  # a CPU rank before its model: Python, torch, DeepSpeed, the data reader (measured, fp32)


@dataclass(frozen=True)
class MemoryLayout:
    """A run's layout (ranks, EP, ZeRO stage, precision) and what else sets its memory; `device` "cpu" adds the
    process's own memory."""

    layout: Layout
    seq_len: int
    micro_batch: int
    checkpointing: str = "none"
    offload: bool = False
    device: str = "cpu"
    sub_group_size: int = 10 ** 12  # ZeRO-3 optimizer sub-group (elements)

    def changed(self, **changes) -> MemoryLayout:
        """A copy with fields of this class or of its `Layout` (zero_stage, ep_size, ...) replaced."""
        ours = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(self)}}
        theirs = {k: v for k, v in changes.items() if k not in ours}
        return dataclasses.replace(self, layout=dataclasses.replace(self.layout, **theirs), **ours)


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # GiB per rank, device memory
    host: dict[str, float]  # GiB per rank offloaded to host memory (GPU runs with optimizer offload)

    @property
    def total_gib(self) -> float:
        return sum(self.parts.values())


def layer_activation_elements(c: ModelConfig, layer_idx: int, mode: str = "none") -> int:
    """Elements saved for the backward pass per token by decoder layer `layer_idx` (`none` or `selective`)."""
    h, nh = c.hidden_size, c.num_attention_heads
    norms = 4 * h + 2 * (c.q_lora_rank or 0) + 2 * c.kv_lora_rank
    attention = (5 * nh * c.qk_head_dim + c.kv_lora_rank + c.qk_rope_head_dim + nh * (c.qk_nope_head_dim + c.v_head_dim)
                 + nh * c.v_head_dim + (nh + 1) * c.qk_rope_head_dim)
    if c.is_moe_layer(layer_idx):
        k, inter = c.num_experts_per_tok, c.moe_intermediate_size
        swiglu = 3 * k * inter + 4 * inter * c.n_shared_experts
        ffn = 3 * c.n_routed_experts + 2 * k * h + 2 * k + swiglu
    else:
        swiglu = 4 * c.intermediate_size
        ffn = swiglu
    return norms + attention + ffn - (swiglu if mode == "selective" else 0)


def activation_bytes(c: ModelConfig, tokens: int, mode: str, dtype_bytes: int) -> float:
    """Bytes of activations one rank holds at its peak for `tokens` tokens per micro-batch."""
    layers = list(range(c.num_hidden_layers + c.num_nextn_predict_layers))
    per_layer = [layer_activation_elements(c, i, "selective" if mode == "selective" else "none") for i in layers]
    head = 6 * c.hidden_size + (4 * c.hidden_size if c.num_nextn_predict_layers else 0)  # norms, loss gradients
    if mode == "full":  # layer inputs (+ the loss side), and one layer being recomputed
        kept = tokens * (len(layers) * c.hidden_size + 3 * head) + tokens * max(per_layer)
    else:
        kept = tokens * (sum(per_layer) + head)
    return kept * dtype_bytes


def head_bytes(c: ModelConfig, tokens: int) -> float:
    """The fused head and loss (`gpt_moe.model.loss`): one chunk of fp32 logits with its softmax gradient and a
    temporary, and the fp32 weight gradient each head call computes in the forward pass and keeps for backward."""
    chunk = min(tokens, max(MIN_CHUNK_TOKENS, math.ceil(tokens / max(1, c.vocab_size // c.hidden_size))))
    calls = 1 + (1 if c.num_nextn_predict_layers else 0)
    return 4 * (3 * chunk * c.vocab_size + calls * c.vocab_size * c.hidden_size)


def model_state_bytes(c: ModelConfig, memory: MemoryLayout) -> dict[str, float]:
    """Parameters, gradients, optimizer (fp32 master + Adam) and Adam's step temporaries of one rank, in bytes."""
    layout, offload = memory.layout, memory.offload
    a = account(c)
    expert = routed_expert_params(c)
    dense, experts = a.total_params + a.mtp_params - expert, expert / layout.ep_size
    edp = layout.world_size // layout.ep_size  # ranks sharing one copy of these experts
    held = dense + experts
    sharded = dense / layout.world_size + experts / edp
    p_bytes = 2 if layout.bf16 else 4
    weights = p_bytes * (sharded if layout.zero_stage >= 3 else held)
    grads = p_bytes * (sharded if layout.zero_stage >= 2 else held)
    master = 0 if layout.zero_stage >= 3 and not layout.bf16 and not offload else 4
    optimizer = (master + 8) * (sharded if layout.zero_stage >= 1 else held)
    largest = min(sharded, memory.sub_group_size) if layout.zero_stage >= 3 else sharded
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "optimizer_step": 2 * 4 * largest}


def training_memory(c: ModelConfig, layout: MemoryLayout) -> MemoryEstimate:
    """What one rank holds at its peak (GiB per part). With optimizer offload on a GPU, the optimizer parts are host
    memory and are reported under "host" names; on a CPU they count."""
    tokens = layout.seq_len * layout.micro_batch
    parts = {name: value / GIB for name, value in model_state_bytes(c, layout).items()}
    parts["activations"] = activation_bytes(c, tokens, layout.checkpointing, 2 if layout.layout.bf16 else 4) / GIB
    parts["head"] = head_bytes(c, tokens) / GIB
    host = {}
    if layout.offload and layout.device != "cpu":
        host = {name: parts.pop(name) for name in ("optimizer", "optimizer_step")}
    if layout.device == "cpu":
        parts["process"] = CPU_PROCESS_GIB
    return MemoryEstimate(parts, host)


def largest_micro_batch(c: ModelConfig, layout: MemoryLayout, budget_gib: float, limit: int = 4096) -> int:
    """The largest micro-batch whose estimate fits `budget_gib` (0 when not even 1 fits)."""
    best, step = 0, 1
    while step <= limit and training_memory(c, layout.changed(micro_batch=step)).total_gib <= budget_gib:
        best, step = step, step * 2
    low, high = best, min(step, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        fits = training_memory(c, layout.changed(micro_batch=mid)).total_gib <= budget_gib
        low, high = (mid, high) if fits else (low, mid)
    return low
