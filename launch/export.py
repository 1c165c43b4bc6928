"""Export a checkpoint to the Hugging Face deepseek_v3 layout (safetensors + config.json + tokenizer + card).

    python launch/export.py CHECKPOINT OUT_DIR [--dtype auto|bf16|fp32]

CHECKPOINT: a run directory (its newest complete checkpoint) or a checkpoints/step_* directory.
--dtype auto (the default) writes the weights in the precision the checkpoint was trained in.
"""

from __future__ import annotations

import argparse
import sys

from gpt_moe.checkpoint.export import DTYPES, export, export_dtype
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weights' dtype: auto (the training precision, default), bf16 or fp32")
    args = parser.parse_args(argv)

    def run() -> None:
        loaded = load_for_inference(args.checkpoint)
        dtype, why = export_dtype(args.dtype, loaded.training)
        out = export(loaded, args.out_dir, dtype=dtype)
        print(f"exported {loaded.source} -> {out} ({str(dtype).removeprefix('torch.')}: {why})")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
