"""Train a DeepSeek-style MoE model under DeepSpeed.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json [options]      # any number of ranks / nodes
    python launch/train.py [options]                                            # one rank, no launcher

Run with --help for the options. The logic lives in gpt_moe/trainer.py.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from gpt_moe.errors import GptMoeError  # noqa: E402
from gpt_moe.train_config import parse_train_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg, explicit, args = parse_train_args(argv)
        inject = {int(s) for s in args.inject_nan_at.split(",") if s}
        from gpt_moe.trainer import Trainer

        trainer = Trainer(cfg, explicit, inject, args.inject_kill_during_save)
        trainer.run()
        if not cfg.dry_run:
            trainer.close()
    except GptMoeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
