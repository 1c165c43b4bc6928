"""Convert a training checkpoint to the layout-free form, which resumes on any number of ranks, EP size,
ZeRO stage and precision (`--resume OUT`).

    python launch/reshard.py CHECKPOINT OUT

CHECKPOINT: a run directory (its newest complete checkpoint) or a checkpoints/step_* directory.
`--resume` converts on the fly as well; converting ahead of time reads the source once.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from gpt_moe.checkpoint.model_dir import locate
from gpt_moe.checkpoint.records import LAYOUT_FREE, read_record
from gpt_moe.checkpoint.reshard import convert
from gpt_moe.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def run() -> None:
        start = time.perf_counter()
        source, _ = locate(args.checkpoint)
        out = convert(source, args.out, progress=not args.no_progress)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"converted {source} ({read_record(out).layout.describe()}) -> {out} ({LAYOUT_FREE}) in "
              f"{time.perf_counter() - start:.1f}s, peak memory {peak_mib:.0f} MiB; resume it with --resume {out}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
