"""Train a DeepSeek-style MoE model under DeepSpeed.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json [options]      # any number of ranks / nodes
    python launch/train.py [options]                                            # one rank, no launcher

Run with --help for the options. The logic lives in gpt_moe/train/ (plan.py, trainer.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from pathlib import Path

from gpt_moe.atomic import missing_dirs, remove_empty_dirs, unwritable_reason
from gpt_moe.checkpoint.records import RUN_LOCK_FILE
from gpt_moe.cli import run_cli
from gpt_moe.errors import ConfigError
from gpt_moe.train.config import parse_train_args
from gpt_moe.train.hardware import Hardware
from gpt_moe.train.plan import RunPlan, launcher_ranks_per_node, plan_run


def prepare_default_data(plan: RunPlan, directory: Path) -> None:
    """The built-in corpus, or for a fine-tuning run the built-in conversations in the base model's tokenizer."""
    from data_prep import prepare_default, prepare_default_chat

    if plan.init_from is not None:
        prepare_default_chat(directory, tokenizer_from=plan.init_from.path)
    else:
        prepare_default(directory)


def train(argv: list[str] | None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    # every rank runs the same code: what it warns of is said once per run, by global rank 0 (errors by any rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    if rank != 0:
        warnings.simplefilter("ignore")  # a library's deprecation and user warnings too
    cfg, explicit, faults = parse_train_args(argv)
    plan = plan_run(cfg, explicit, int(os.environ.get("WORLD_SIZE", "1")), Hardware.detect(),
                    launcher_ranks_per_node())
    if cfg.dry_run:
        print(plan.banner())
        return 0
    made = missing_dirs(plan.run_dir)
    reason = unwritable_reason(plan.run_dir)
    if reason:
        raise ConfigError(f"--run-dir {plan.run_dir}: cannot write there ({reason}); choose a writable directory")

    from gpt_moe.train.engine import end_distributed
    from gpt_moe.train.trainer import Trainer

    try:
        try:
            trainer = Trainer(plan, faults, prepare_data=lambda directory: prepare_default_data(plan, directory))
        except BaseException:
            if made:  # refused while starting (data, weights): the run directory this start made is taken back
                (made[0] / RUN_LOCK_FILE).unlink(missing_ok=True)
                remove_empty_dirs(made)
            raise
        trainer.run()
        trainer.close()
    finally:
        end_distributed()  # however the run ended: no communication thread may outlive the interpreter
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: train(argv))


def exit_without_teardown(code: int) -> None:
    """Ends the process once the run is over: every file is written and closed and the process group is down, so
    the interpreter's own teardown has nothing left to do but destroy C++ objects, and there a communication
    thread still joinable aborts the process now and then ("terminate called without an active exception", exit
    134, after a ZeRO-3 run had finished). The exit handlers still run (a run that failed releases its run lock
    there); the exit code is the run's."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
