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

from gpt_moe.checkpoint import read_complete_info
from gpt_moe.cli import run_cli
from gpt_moe.loading import resolve_checkpoint
from gpt_moe.reshard import LAYOUT_FREE, convert, describe_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def run() -> None:
        start = time.perf_counter()
        source = resolve_checkpoint(args.checkpoint)
        out = convert(source, args.out, progress=not args.no_progress)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"converted {source} ({describe_layout(read_complete_info(out))}) -> {out} ({LAYOUT_FREE}) in "
              f"{time.perf_counter() - start:.1f}s, peak memory {peak_mib:.0f} MiB; resume it with --resume {out}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
