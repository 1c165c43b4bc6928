"""Training throughput: our model vs transformers' DeepseekV3ForCausalLM, same config, batch and DeepSpeed
config, measured in alternating steps in one process (one rank).

    python launch/bench.py train [--model tiny] [--deepspeed ds_configs/zero2.json] [--steps 10]

MTP is switched off for both (transformers does not train it). MFU uses activated-parameter
FLOPs (gpt_moe.params) against the peak of the device (on CPU: a matmul measured in the training dtype,
bf16 where the CPU has native bf16 instructions, else fp32).
"""

from __future__ import annotations

import argparse

import torch

from timing import interleaved_medians


def training_step(model: torch.nn.Module, ds_config: dict, batch: torch.Tensor, labels: torch.Tensor):
    """A DeepSpeed engine around `model` and a function running one optimizer step of it."""
    import deepspeed

    from gpt_moe.trainer import param_groups

    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)

    def step() -> None:
        loss = engine(batch, labels=labels).loss
        engine.backward(loss)
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
    from gpt_moe.trainer import ensure_single_process_env

    ensure_single_process_env()

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from gpt_moe.config import ModelConfig, to_hf_config
    from gpt_moe.ds_config import TrainingShape, load_ds_config, resolve_ds_config
    from gpt_moe.hardware import device_peak_flops, keep_freed_memory, native_bf16
    from gpt_moe.model import DeepSeekForCausalLM
    from gpt_moe.params import account

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    config = ModelConfig.load(args.model).replace(num_nextn_predict_layers=0)
    accelerator = get_accelerator()
    bf16_supported = accelerator.is_bf16_supported()
    shape = TrainingShape(args.micro_batch, 1, 1, 1e-3, 0.1, 1.0, bf16_supported, config.hidden_size,
                          bf16_native=native_bf16(accelerator.device_name(), bf16_supported),
                          device_type=accelerator.device_name())
    ds_config, _ = resolve_ds_config(load_ds_config(args.deepspeed), shape)
    device = torch.device(accelerator.current_device_name())
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does, for both models
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    ours = training_step(DeepSeekForCausalLM(config, seed=0), ds_config, inputs, targets)
    torch.manual_seed(0)
    theirs_model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_config(config)))
    # transformers shifts the labels itself: give it the unshifted sequence
    theirs = training_step(theirs_model, ds_config, inputs, inputs)
    seconds = interleaved_medians({"gpt-moe": ours, "transformers": theirs}, args.steps)
    rates = {name: inputs.numel() / value for name, value in seconds.items()}

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    peak, how = device_peak_flops(device, dtype)
    flops = account(config, args.seq_len).flops_per_token
    print(f"training throughput, model {config.name} (MTP off), batch {args.micro_batch} x {args.seq_len}, "
          f"{args.deepspeed} (ZeRO {ds_config['zero_optimization']['stage']}, bf16 {ds_config['bf16']['enabled']}), "
          f"{torch.get_num_threads()} threads; peak {peak / 1e9:.0f} GFLOP/s ({how})")
    print(f"{'':>14} {'tokens/s':>10} {'MFU':>7}")
    for name, rate in rates.items():
        print(f"{name:>14} {rate:10.0f} {rate * flops / peak:7.1%}")
    print(f"gpt-moe / transformers: {rates['gpt-moe'] / rates['transformers']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
