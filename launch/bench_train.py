"""Training throughput: our model vs transformers' DeepseekV3ForCausalLM, same config, batch and DeepSpeed
config, measured in alternating steps in one process (one rank).

    python launch/bench.py train [--model tiny] [--deepspeed ds_configs/zero2.json] [--steps 10]

Both engines come from the trainer's engine builder and the plan `launch/train.py` makes for the same flags, so the
step timed is the step training runs. MTP is switched off for both (transformers does not train it). MFU uses
activated-parameter FLOPs (gpt_moe.model.params) against the peak of the device (on CPU: a matmul measured in the
training dtype, bf16 where the CPU has native bf16 instructions, else fp32).
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians


def plan_for(args: argparse.Namespace):
    """The training plan of `launch/train.py --model M --deepspeed D --seq-len S --micro-batch B` on one rank."""
    from gpt_moe.train.config import TrainConfig
    from gpt_moe.train.hardware import Hardware
    from gpt_moe.train.plan import plan_run

    cfg = TrainConfig(model=args.model, deepspeed_config=args.deepspeed, seq_len=args.seq_len,
                      micro_batch=args.micro_batch)
    return plan_run(cfg, frozenset({"--model", "--deepspeed", "--seq-len", "--micro-batch"}), 1, Hardware.detect())


def training_step(plan, model: torch.nn.Module, **inputs: torch.Tensor):
    """The trainer's DeepSpeed engine around `model` and a function running one optimizer step of it on `inputs`
    (the model's keyword arguments)."""
    from gpt_moe.train.engine import build_engine

    engine = build_engine(plan, model)

    def step() -> None:
        engine.backward(engine(**inputs).loss)
        engine.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from gpt_moe.model.config import to_hf_config
    from gpt_moe.model.model import DeepSeekForCausalLM
    from gpt_moe.model.params import account
    from gpt_moe.train.engine import start_distributed
    from gpt_moe.train.hardware import device_peak_flops

    plan = plan_for(args)
    device = start_distributed(plan.zero_stage).device
    config = plan.model.replace(num_nextn_predict_layers=0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    ours = training_step(plan, DeepSeekForCausalLM(config, seed=0), input_ids=inputs, labels=targets)
    torch.manual_seed(0)
    theirs_model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_config(config)))
    # transformers shifts the labels itself: give it the unshifted sequence
    theirs = training_step(plan, theirs_model, input_ids=inputs, labels=inputs)
    seconds = interleaved_medians({"gpt-moe": ours, "transformers": theirs}, args.steps)
    rates = {name: inputs.numel() / value for name, value in seconds.items()}

    dtype = torch.bfloat16 if plan.bf16 else torch.float32
    peak, how = device_peak_flops(device, dtype)
    flops = account(config, args.seq_len).flops_per_token
    print(f"training throughput, model {config.name} (MTP off), batch {args.micro_batch} x {args.seq_len}, "
          f"{args.deepspeed} (ZeRO {plan.zero_stage}, bf16 {plan.bf16}), "
          f"{torch.get_num_threads()} threads; peak {peak / 1e9:.0f} GFLOP/s ({how})")
    print(f"{'':>14} {'tokens/s':>10} {'MFU':>7}")
    wrong_peak = False
    for name, rate in rates.items():
        mfu = rate * flops / peak
        wrong_peak |= mfu > 1
        print(f"{name:>14} {rate:10.0f} " + (f"{mfu:7.1%}" if mfu <= 1 else "  wrong peak"))
    if wrong_peak:  # as the trainer's MFU (gpt_moe.train.metrics): above 100% the peak is what is wrong
        print(f"MFU above 100%: the peak ({how}) is too low, likely measured while something else ran; remove its "
              "entry from that cache file and run again")
    print(f"gpt-moe / transformers: {rates['gpt-moe'] / rates['transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
