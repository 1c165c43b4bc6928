"""Checkpoints of a running training: save (every rank), mark complete (rank 0, after every rank wrote its files),
keep the last N, abandon a failed save in one line, and resume what the plan chose.

A save is visible only once complete (`gpt_moe.checkpoint.records`): DeepSpeed's files and each rank's RNG state
first, a vote on whether every rank succeeded (the all-reduce is also the "all written" barrier), then rank 0
writes the model config, the tokenizer and the COMPLETE record. A save that fails anywhere removes the partial
tag and stops the run with one line; the complete checkpoints stay. On node-local disks (`gpt_moe.train.disks`)
each node's first rank does rank 0's part in its node's directory, and the COMPLETE record, the same on every
node, lists which node holds which files.

Resuming in the plan's own layout uses DeepSpeed's loader; any other layout (or a layout-free checkpoint) goes
through `gpt_moe.checkpoint.reshard`, which reads the state parameter by parameter.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpt_moe.atomic import fsync_dir, fsync_file
from gpt_moe.checkpoint.deepspeed_files import check_data_only, load_rank_state, save_rank_state
from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.checkpoint.node_files import rank_files, require_files, tag_files
from gpt_moe.checkpoint.records import (CheckpointRecord, ClientState, describe_save_failure, newest_complete, prune,
                                        save_inference_files, tag_for_step, write_record)
from gpt_moe.checkpoint.reshard import DeepSpeedSource, LayoutFreeSource, load_into_engine, open_source
from gpt_moe.data.tokenizer import TokenizerInfo
from gpt_moe.errors import GptMoeError
from gpt_moe.train.config import FaultInjection
from gpt_moe.train.disks import Disks
from gpt_moe.train.engine import Distributed
from gpt_moe.train.plan import ResumePlan, RunPlan

log = logging.getLogger(__name__)


def open_resume_source(resume: ResumePlan | None, rank: int) -> DeepSpeedSource | LayoutFreeSource | None:
    """Before any engine starts (a refusal costs nothing): a checkpoint to convert is opened, its records read and
    its experts checked (written on node-local disks, it must be gathered); one that DeepSpeed's loader will read
    on rank `rank` must hold that rank's files and is checked for pickled code first (that loader unpickles
    freely). Returns the resharding source, or None."""
    if resume is None:
        return None
    if resume.convert:
        return open_source(resume.tag)
    require_files(resume.tag, resume.record, rank)
    check_data_only(resume.tag)
    return None


class Checkpointer:
    """Saving and resuming one run's checkpoints on this rank."""

    def __init__(self, plan: RunPlan, context: Distributed, disks: Disks, engine, tokenizer: TokenizerInfo,
                 data_dir: Path, expert_ranges: list[list[int] | None],
                 faults: FaultInjection = FaultInjection()) -> None:
        self.plan, self.context, self.disks, self.engine, self.faults = plan, context, disks, engine, faults
        self.tokenizer, self.data_dir, self.expert_ranges = tokenizer, data_dir, expert_ranges

    def save(self, client: ClientState, evaluation: Evaluation | None, chat: bool) -> Path:
        """Writes the checkpoint of `client.step` on every rank and marks it complete, with the last evaluation
        (rank 0's, which holds the routing drift) in its record; returns its tag directory."""
        tag_dir = self.plan.checkpoint_dir / tag_for_step(client.step)
        failure: BaseException | None = None
        try:
            self.engine.save_checkpoint(str(self.plan.checkpoint_dir), tag=tag_dir.name,
                                        client_state=client.to_dict())
            save_rank_state(tag_dir, self.context.rank)
            self._make_durable(tag_dir)
            if client.step == self.faults.full_disk_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
        except (OSError, RuntimeError) as err:  # a full disk surfaces as either (torch.save: "unexpected pos")
            failure = err
        if client.step == self.faults.kill_during_save_at and self.context.is_rank0:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the tests: die before COMPLETE
        if self.context.all_reduce(torch.tensor([float(failure is not None)])).item():  # also the "all written" barrier
            self._abandon(tag_dir, failure)
        nodes = self.disks.node_files(self.context, tag_dir)
        plan, record = self.plan, None
        if self.context.is_rank0:
            ranges = tuple(tuple(r) if r else None for r in self.expert_ranges)
            record = CheckpointRecord(client.step, plan.layout, client.tokens_seen, ranges, plan.model.name, chat,
                                      str(plan.init_from.path) if plan.init_from else None,
                                      completed_at=time.time(), evaluation=evaluation, nodes=nodes)
        if self.disks.node_local:
            record = self.context.from_rank0(record)  # every node's COMPLETE the same, byte for byte
        if self.disks.writer:
            save_inference_files(tag_dir, plan.model, self.tokenizer, self.data_dir)
            write_record(tag_dir, record)
            prune(plan.checkpoint_dir, plan.train.keep_last)
        dist.barrier()
        return tag_dir

    def _make_durable(self, tag_dir: Path) -> None:
        """fsync the files of `tag_dir` this rank's resume reads (`node_files.rank_files`), its own among them:
        DeepSpeed writes without it, and COMPLETE must come after every file is on disk."""
        rank = self.context.rank
        experts = self.expert_ranges[rank]
        for name in sorted(rank_files(tag_files(tag_dir), rank, tuple(experts) if experts else None)):
            fsync_file(tag_dir / name)
        fsync_dir(tag_dir)

    def _abandon(self, tag_dir: Path, failure: BaseException | None) -> None:
        """A save failed on some rank: remove the partial tag, keep the complete ones, stop with one line."""
        if self.disks.writer:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        why = describe_save_failure(failure, self.plan.checkpoint_dir) if failure else "failed on another rank"
        newest = newest_complete(self.plan.checkpoint_dir)
        raise GptMoeError(f"{tag_dir}: saving the checkpoint failed ({why}); the partial checkpoint was removed and "
                          f"the newest complete one is {newest or 'none'}; free space or fix the permissions, then "
                          "rerun the same command to resume")

    def resume(self, source: DeepSpeedSource | LayoutFreeSource | None) -> ClientState | None:
        """Loads the checkpoint the plan resumes (through `source` when it converts between layouts) into the
        engine; returns its client state, or None when the run starts fresh."""
        resume = self.plan.resume
        if resume is None:
            return None
        if source is not None:
            if self.context.is_rank0:
                log.warning("%s: converting from %s to %s", resume.tag, resume.record.layout.describe(),
                            self.plan.layout.describe())
            client = load_into_engine(self.engine, source, self.plan.train.seed)
        else:
            _, saved = self.engine.load_checkpoint(str(resume.tag.parent), tag=resume.tag.name)
            load_rank_state(resume.tag, self.context.rank)
            client = ClientState.from_dict(saved)
        if self.context.is_rank0:
            log.warning("resumed from %s at step %d (%d tokens seen)", resume.tag, client.step, client.tokens_seen)
            if resume.batch_note:
                log.warning("resume: %s", resume.batch_note)
        return client
