"""Packed fine-tuning vs pretraining: training tokens/s of the same model at the same row shape, measured in
alternating steps in one process (one rank, DeepSpeed engine), and the padding of the packed rows.

    python launch/bench.py sft [--data data/chat-builtin] [--seq-len 512] [--micro-batch 8] [--steps 10]

Pretraining rows are windows of the chat data's own tokens (every position trained); fine-tuning rows are its
conversations packed best-fit (gpt_moe.chat_data), with per-conversation positions, the block-diagonal
attention mask and the loss on assistant tokens only. Both count every position of the row as a token.
"""

from __future__ import annotations

import argparse

import torch

from timing import interleaved_medians


def engine_step(model: torch.nn.Module, ds_config: dict, inputs: dict[str, torch.Tensor]):
    """A DeepSpeed engine around `model` and a function running one optimizer step on `inputs`."""
    import deepspeed

    from gpt_moe.trainer import param_groups

    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)

    def step() -> None:
        engine.backward(engine(**inputs).loss)
        engine.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default="data/chat-builtin")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    from gpt_moe.trainer import ensure_single_process_env

    ensure_single_process_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from gpt_moe.chat_data import ChatBatches
    from gpt_moe.config import ModelConfig
    from gpt_moe.data import TokenShards, TrainBatches
    from gpt_moe.ds_config import TrainingShape, load_ds_config, resolve_ds_config
    from gpt_moe.hardware import keep_freed_memory, native_bf16
    from gpt_moe.model import DeepSeekForCausalLM

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    accelerator = get_accelerator()
    supported = accelerator.is_bf16_supported()
    shape = TrainingShape(args.micro_batch, 1, 1, 1e-3, 0.1, 1.0, supported, 1,
                          bf16_native=native_bf16(accelerator.device_name(), supported),
                          device_type=accelerator.device_name())
    ds_config, _ = resolve_ds_config(load_ds_config(args.deepspeed), shape)
    device = torch.device(accelerator.current_device_name())
    if device.type == "cpu":
        keep_freed_memory()
    shards = TokenShards(args.data)
    config = ModelConfig.load(args.model).replace(vocab_size=max(shards.n_vocab, 256))
    packed_loader = ChatBatches(shards, args.seq_len, args.micro_batch, seed=0)
    packed = packed_loader.next_batch().to(device)
    windows, labels = TrainBatches(shards, args.seq_len, args.micro_batch, seed=0).next_batch()
    steps = {"pretraining": engine_step(DeepSeekForCausalLM(config, seed=0), ds_config,
                                        {"input_ids": windows.to(device), "labels": labels.to(device)}),
             "fine-tuning": engine_step(DeepSeekForCausalLM(config, seed=0), ds_config, packed.model_inputs())}
    seconds = interleaved_medians(steps, args.steps)
    rates = {name: windows.numel() / value for name, value in seconds.items()}
    print(f"packed fine-tuning vs pretraining, model {config.name}, rows {args.micro_batch} x {args.seq_len}, "
          f"{args.deepspeed} (bf16 {ds_config['bf16']['enabled']}), {torch.get_num_threads()} threads")
    print(f"padding of the packed rows: {packed_loader.rows.padding_fraction:.1%} over the whole training split "
          f"({len(packed_loader.rows)} rows of {len(packed_loader.rows.conversations)} conversations); "
          f"trained tokens {packed.trained_tokens()[0] / packed.input_ids.numel():.0%} of the timed batch's positions")
    for name, rate in rates.items():
        print(f"{name:>12} {rate:10.0f} tokens/s")
    print(f"fine-tuning / pretraining: {rates['fine-tuning'] / rates['pretraining']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
