"""Benchmarks, each measured side by side in one run: python launch/bench.py NAME [options].

    moe      our MoE layer vs a dense SwiGLU of equal activated size vs transformers' DeepseekV3MoE
    train    a training step: ours vs transformers' DeepseekV3ForCausalLM under the same DeepSpeed config
    profile  where one training step's time goes, by part, in fp32 and bf16
    compile  a training forward and backward with --compile's compiled layers vs eager
    decode   latent-cache decoding vs no cache and per-head K/V; self-speculative decoding
    data     data_prep tokens/s with 1 and 2 workers vs raw tiktoken, and peak memory
    sft      packed chat fine-tuning vs pretraining tokens/s at the same row shape, and the padding of the rows

Each NAME is launch/bench_NAME.py with a main(argv) function.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main() -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        print(__doc__)
        print(f"available: {', '.join(names)}")
        return 2
    return importlib.import_module(f"bench_{sys.argv[1]}").main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
