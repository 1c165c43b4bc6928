"""Export a checkpoint to the Hugging Face deepseek_v3 layout (safetensors + config.json + tokenizer + card).

    python launch/export.py CHECKPOINT OUT_DIR [--dtype bfloat16|float32]

CHECKPOINT: a run directory (its newest complete checkpoint) or a checkpoints/step_* directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from gpt_moe.checkpoint import load_for_inference  # noqa: E402
from gpt_moe.errors import GptMoeError  # noqa: E402
from gpt_moe.export import export  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    try:
        loaded = load_for_inference(args.checkpoint)
        out = export(loaded, args.out_dir, dtype=getattr(torch, args.dtype))
    except GptMoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {loaded.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
