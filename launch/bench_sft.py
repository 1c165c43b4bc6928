"""Packed fine-tuning vs pretraining: training tokens/s of the same model at the same row shape, measured in
alternating steps in one process (one rank, DeepSpeed engine), and the padding of the packed rows.

    python launch/bench.py sft [--data data/chat-builtin] [--seq-len 512] [--micro-batch 8] [--steps 10]

Pretraining rows are windows of the chat data's own tokens (every position trained); fine-tuning rows are its
conversations packed best-fit (gpt_moe.data.chat_batches), with per-conversation positions, the block-diagonal
attention mask and the loss on assistant tokens only. Both count every position of the row as a token.
"""

from __future__ import annotations

import argparse

from bench_train import plan_for, training_step
from timing import interleaved_medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default="data/chat-builtin")
    parser.add_argument("--deepspeed", default="ds_configs/zero2.json")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    from gpt_moe.data.chat_batches import ChatBatches
    from gpt_moe.data.shards import TokenShards, TrainBatches
    from gpt_moe.model.model import DeepSeekForCausalLM
    from gpt_moe.train.engine import start_distributed

    plan = plan_for(args)
    device = start_distributed(plan.zero_stage).device
    shards = TokenShards(args.data)
    config = plan.model.replace(vocab_size=max(shards.n_vocab, 256))
    packed_loader = ChatBatches(shards, args.seq_len, args.micro_batch, seed=0)
    packed = packed_loader.next_batch().to(device)
    windows, labels = TrainBatches(shards, args.seq_len, args.micro_batch, seed=0).next_batch()
    steps = {"pretraining": training_step(plan, DeepSeekForCausalLM(config, seed=0), input_ids=windows.to(device),
                                          labels=labels.to(device)),
             "fine-tuning": training_step(plan, DeepSeekForCausalLM(config, seed=0), **packed.model_inputs())}
    seconds = interleaved_medians(steps, args.steps)
    rates = {name: windows.numel() / value for name, value in seconds.items()}
    print(f"packed fine-tuning vs pretraining, model {config.name}, rows {args.micro_batch} x {args.seq_len}, "
          f"{args.deepspeed} (bf16 {plan.bf16}), {torch.get_num_threads()} threads")
    print(f"padding of the packed rows: {packed_loader.rows.padding_fraction:.1%} over the whole training split "
          f"({len(packed_loader.rows)} rows of {len(packed_loader.rows.conversations)} conversations); "
          f"trained tokens {packed.trained_tokens()[0] / packed.input_ids.numel():.0%} of the timed batch's positions")
    for name, rate in rates.items():
        print(f"{name:>12} {rate:10.0f} tokens/s")
    print(f"fine-tuning / pretraining: {rates['fine-tuning'] / rates['pretraining']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
