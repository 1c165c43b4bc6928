"""MoE layer speed: forward+backward of our DeepSeekMoE against, on the same input and in one run,

* a dense SwiGLU FFN with the same activated parameters (intermediate = (top_k + shared) x expert size),
* transformers' DeepseekV3MoE loaded with the same weights, with its default experts
  implementation ("grouped_mm") and with its "eager" per-expert loop.

    python launch/bench.py moe [--tokens 4096] [--hidden 512] [--dtype auto|bf16|fp32] [--repeats 9]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians

from gpt_moe.model.config import ModelConfig, to_hf_config
from gpt_moe.model.moe import MLP, MoE
from gpt_moe.train.hardware import keep_freed_memory, resolve_dtype

SHAPES = [  # (routed experts, top-k, shared experts, groups, groups kept)
    (64, 6, 2, 1, 1),
    (16, 2, 1, 1, 1),
]


def forward_backward(module, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward of `module` on x with a fixed upstream gradient (as in training)."""

    def run() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x.detach().requires_grad_())
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return run


def transformers_moe(config: ModelConfig, ours: MoE, implementation: str, dtype: torch.dtype):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = DeepseekV3Config(**to_hf_config(config))
    hf_config._experts_implementation = implementation
    theirs = DeepseekV3MoE(hf_config)
    theirs.load_state_dict(ours.state_dict())
    return theirs.to(dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-size", type=int, default=256, help="moe_intermediate_size")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where this CPU/GPU has native bf16 matmuls, else fp32")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds")
    args = parser.parse_args(argv)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    keep_freed_memory()  # for every contestant alike
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"MoE forward+backward, {args.tokens} tokens, hidden {args.hidden}, expert size {args.expert_size}, "
          f"{dtype_name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'experts/top-k/shared':>22} {'ours ms':>9} {'dense ms':>9} {'HF grouped ms':>14} {'HF eager ms':>12}" \
             f" {'ours/dense':>11} {'HF grouped/ours':>16} {'HF eager/ours':>14}"
    print(header)
    for experts, top_k, shared, groups, kept in SHAPES:
        config = ModelConfig.from_preset("tiny").replace(
            hidden_size=args.hidden, moe_intermediate_size=args.expert_size, n_routed_experts=experts,
            num_experts_per_tok=top_k, n_shared_experts=shared, n_group=groups, topk_group=kept,
            seq_aux_loss_coef=0.0)
        torch.manual_seed(0)
        ours = MoE(config)
        for p in ours.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ours = ours.to(dtype)
        dense = MLP(args.hidden, (top_k + shared) * args.expert_size).to(dtype)
        x = torch.randn(1, args.tokens, args.hidden, dtype=dtype)
        grad = torch.randn_like(x)
        times = interleaved_medians({
            "ours": forward_backward(ours, x, grad),
            "dense": forward_backward(dense, x, grad),
            "grouped": forward_backward(transformers_moe(config, ours, "grouped_mm", dtype), x, grad),
            "eager": forward_backward(transformers_moe(config, ours, "eager", dtype), x, grad),
        }, args.repeats)
        t_ours, t_dense, t_grouped, t_eager = (times[name] for name in ("ours", "dense", "grouped", "eager"))
        print(f"{f'{experts}/{top_k}/{shared}':>22} {t_ours * 1e3:9.1f} {t_dense * 1e3:9.1f} {t_grouped * 1e3:14.1f}"
              f" {t_eager * 1e3:12.1f} {t_ours / t_dense:10.2f}x {t_grouped / t_ours:15.2f}x {t_eager / t_ours:13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
