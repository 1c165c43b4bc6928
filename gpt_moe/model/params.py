"""Closed-form model accounting: parameters (total / activated), KV-cache bytes, training FLOPs.

    python -m gpt_moe.model.params NAME_OR_JSON [--seq-len N] [--json]

Counts are computed from the config alone (no weights are built), so they work for
DeepSeek-V3's 671B shape on a laptop; the tests check them against the parameters of
real models. "Activated" parameters are all parameters minus the routed experts a token
does not use and minus the input embedding table (a token reads one row of it; the
output head is a full matmul and counts). This is the convention that reproduces the
published figures: DeepSeek-V3 36.6B ("37B"), V2 20.9B ("21B"), V2-Lite 2.45B ("2.4B");
counting the embedding too gives 37.6B / 21.4B / 2.66B. The MTP module is reported
separately (DeepSeek's 671B / 37B exclude it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from gpt_moe.cli import run_cli
from gpt_moe.model.config import ModelConfig


@dataclass
class ModelAccount:
    name: str
    total_params: int  # main model, without MTP
    active_params: int  # per token, without MTP, without the input embedding table
    active_params_with_embedding: int
    mtp_params: int  # the MTP block (its embedding and head are shared with the model)
    mtp_active_params: int
    embedding_params: int  # embed_tokens (+ lm_head when untied)
    kv_cache_bytes_per_token: int  # MLA latent + RoPE key, all layers, at `cache_dtype_bytes`
    mha_kv_cache_bytes_per_token: int  # per-head keys and values of the same attention, all layers
    flops_per_token: int  # training (forward + backward) at `seq_len`, MTP included when present
    seq_len: int
    cache_dtype_bytes: int = 2


def attention_params(c: ModelConfig) -> int:
    nh = c.num_attention_heads
    if c.q_lora_rank:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
    else:
        q = c.hidden_size * nh * c.qk_head_dim
    kv = (c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
          + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim))
    return q + kv + nh * c.v_head_dim * c.hidden_size


def expert_params(c: ModelConfig) -> int:
    """Parameters of one (routed or shared) SwiGLU expert: gate, up and down projections."""
    return 3 * c.hidden_size * c.moe_intermediate_size


def routed_expert_params(c: ModelConfig) -> int:
    """Parameters of all routed experts: every MoE layer's, the MTP block's included."""
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    return sum(c.is_moe_layer(i) for i in range(layers)) * c.n_routed_experts * expert_params(c)


def moe_params(c: ModelConfig) -> tuple[int, int]:
    """(total, activated) parameters of one MoE feed-forward."""
    expert = expert_params(c)
    shared = c.n_shared_experts * expert
    router = c.n_routed_experts * c.hidden_size
    return router + shared + c.n_routed_experts * expert, router + shared + c.num_experts_per_tok * expert


def layer_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, activated) parameters of decoder layer `layer_idx` (norms included)."""
    base = attention_params(c) + 2 * c.hidden_size
    if c.is_moe_layer(layer_idx):
        total, active = moe_params(c)
        return base + total, base + active
    dense = 3 * c.hidden_size * c.intermediate_size
    return base + dense, base + dense


def account(c: ModelConfig, seq_len: int | None = None, cache_dtype_bytes: int = 2) -> ModelAccount:
    seq_len = seq_len or min(4096, c.max_position_embeddings)
    embedding = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    layers = [layer_params(c, i) for i in range(c.num_hidden_layers)]
    total = embedding + c.hidden_size + sum(t for t, _ in layers)
    input_embedding = c.vocab_size * c.hidden_size
    active_with_embedding = embedding + c.hidden_size + sum(a for _, a in layers)
    active = active_with_embedding - (0 if c.tie_word_embeddings else input_embedding)

    mtp_total = mtp_active = 0
    if c.num_nextn_predict_layers:
        block_total, block_active = layer_params(c, c.num_hidden_layers)
        glue = 3 * c.hidden_size + 2 * c.hidden_size * c.hidden_size  # enorm, hnorm, head norm, eh_proj
        mtp_total, mtp_active = block_total + glue, block_active + glue

    # matmul FLOPs: 2 per multiply-add forward, x3 with backward; the embedding lookup is free,
    # the output head is a matmul (once more for MTP's prediction).
    head = c.vocab_size * c.hidden_size
    matmul_params = active + (mtp_active + head if c.num_nextn_predict_layers else 0)
    attention_layers = c.num_hidden_layers + c.num_nextn_predict_layers
    # causal attention: on average seq/2 keys per query; scores (qk_head_dim) and mixing (v_head_dim)
    attention_flops = 2 * attention_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len // 2
    flops = 3 * (2 * matmul_params + attention_flops)

    latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * cache_dtype_bytes
    mha = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * cache_dtype_bytes
    return ModelAccount(name=c.name, total_params=total, active_params=active,
                        active_params_with_embedding=active_with_embedding, mtp_params=mtp_total,
                        mtp_active_params=mtp_active, embedding_params=embedding, kv_cache_bytes_per_token=latent,
                        mha_kv_cache_bytes_per_token=mha, flops_per_token=flops, seq_len=seq_len,
                        cache_dtype_bytes=cache_dtype_bytes)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def describe(a: ModelAccount) -> str:
    return "\n".join([
        f"model {a.name}",
        f"  parameters       total {human(a.total_params):>9}   activated {human(a.active_params):>9}"
        f"   ({human(a.active_params_with_embedding)} counting the input embedding)",
        f"  MTP module       total {human(a.mtp_params):>9}   activated {human(a.mtp_active_params):>9}",
        f"  KV cache / token MLA latent {a.kv_cache_bytes_per_token:,} B   vs multi-head "
        f"{a.mha_kv_cache_bytes_per_token:,} B ({a.mha_kv_cache_bytes_per_token / a.kv_cache_bytes_per_token:.1f}x)"
        f"  at {a.cache_dtype_bytes} bytes/value",
        f"  training FLOPs / token at seq {a.seq_len}: {human(a.flops_per_token)}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt_moe.model.params", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="preset name (tiny, small, medium, deepseek-v2-lite, deepseek-v3) or JSON path")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default min(4096, max))")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    def show() -> None:
        result = account(ModelConfig.load(args.model), args.seq_len)
        print(json.dumps(asdict(result)) if args.json else describe(result))

    return run_cli(show)


if __name__ == "__main__":
    sys.exit(main())
