"""Export a checkpoint to the Hugging Face deepseek_v3 layout (safetensors + config.json + tokenizer + card).

    python launch/export.py CHECKPOINT OUT_DIR [--dtype bfloat16|float32]

CHECKPOINT: a run directory (its newest complete checkpoint) or a checkpoints/step_* directory.
"""

from __future__ import annotations

import argparse
import sys

import torch

from gpt_moe.cli import run_cli
from gpt_moe.export import export
from gpt_moe.loading import load_for_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)

    def run() -> None:
        loaded = load_for_inference(args.checkpoint)
        out = export(loaded, args.out_dir, dtype=getattr(torch, args.dtype))
        print(f"exported {loaded.source} -> {out}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
