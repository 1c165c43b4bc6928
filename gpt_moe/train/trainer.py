"""The training loop on the DeepSpeed engine: start-up, the optimizer step and aux-loss-free balancing. It hands
checkpoints to the `Checkpointer`, logs to the `TrainingMonitor` and evaluations to the `Evaluator`.

One optimizer step = `grad_accum` micro-batches on every rank. After each applied step the
per-expert token counts of all micro-batches are summed over all ranks and every MoE
layer's bias moves once (aux-loss-free balancing). Non-finite steps are skipped by
DeepSpeed's gradient-overflow check on all ranks and counted; `max_bad_steps` in a row
stop the run after saving the last good state.

    trainer = Trainer(plan_run(...))   # distributed start, data, engine (see gpt_moe.train.plan)
    trainer.run()                      # resumes what the plan says, trains; returns the summary (summary.json)
    trainer.close()
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_moe.atomic import write_atomic
from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.checkpoint.records import RUN_CONFIG_FILE, ClientState, newest_complete, run_directory_lock
from gpt_moe.data.chat_batches import ChatBatches, ChatValBatches, PackedBatch
from gpt_moe.data.mixed_batches import MixedBatches, text_rows
from gpt_moe.data.shards import TokenShards, TrainBatches, ValBatches
from gpt_moe.data.validation import model_inputs
from gpt_moe.data.verify import verify_data
from gpt_moe.errors import DataError, GptMoeError, LostRankError
from gpt_moe.model.moe import update_bias
from gpt_moe.train.checkpointer import Checkpointer, open_resume_source
from gpt_moe.train.config import FaultInjection
from gpt_moe.train.disks import detect_disks, planned_for
from gpt_moe.train.engine import (build_engine, build_model, check_same_precision, lost_rank_reason,
                                  start_distributed)
from gpt_moe.train.evaluator import Evaluator, ParentRouting
from gpt_moe.train.hardware import release_freed_memory
from gpt_moe.train.monitor import LOSS_NAMES, TrainingMonitor
from gpt_moe.train.plan import RunPlan

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The run's counters (saved in every checkpoint's client state)."""

    step: int = 0
    tokens_seen: int = 0
    trained_tokens: int = 0  # chat data: assistant tokens trained on (and the text rows' with --mix-pretrain)
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0


class Trainer:
    """One training run on this rank. `prepare_data(directory)` prepares the default corpus when the plan
    says it is missing (rank 0 calls it; the others wait)."""

    def __init__(self, plan: RunPlan, faults: FaultInjection = FaultInjection(),
                 prepare_data: Callable[[Path], None] | None = None) -> None:
        self.started = time.perf_counter()
        self.plan, self.cfg, self.faults = plan, plan.train, faults
        try:  # before anything heavy starts: a refusal costs little
            self.resume_source, refusal = open_resume_source(plan.resume, int(os.environ.get("RANK", "0"))), None
        except GptMoeError as err:  # raised once the process group is up, on every rank (a node's own disk may lack
            self.resume_source, refusal = None, err  # the files: the other nodes must not wait for it)
        self.context = context = start_distributed(plan.zero_stage, self.cfg.dist_timeout,
                                                    self.cfg.join_timeout)
        context.raise_any(refusal)
        check_same_precision(plan, context)
        self.disks = disks = detect_disks(plan.run_dir, context)
        disks.check_same_resume(context, plan.resume, self.cfg.resume)
        self.plan = plan = planned_for(plan, disks)
        # one run per run directory (each node's, on node-local disks): a second run is refused here, before it
        # writes anything
        self.run_lock = context.on_ranks(disks.writer, lambda: run_directory_lock(plan.run_dir).acquire())
        self._prepare_default_data(prepare_data)
        self.shards = TokenShards(self.cfg.data)
        self.shards.check_vocab(plan.model.vocab_size)
        self.mix_shards = TokenShards(self.cfg.mix_data) if self.cfg.mix_pretrain else None
        self._verify_data()
        self.chat = self.shards.content == "chat"  # fine-tuning on conversations: packed rows, trained tokens
        self.loader = self._training_batches()
        val_batches = self._validation_batches()
        model, self.init_report = build_model(plan, context)
        self.engine = build_engine(plan, model)
        if context.device.type == "cpu":
            release_freed_memory()  # what building the engine freed (see there)
        self.moe_layers = self.engine.module.moe_layers()
        self.expert_ranges = self._gather_expert_ranges()
        self.progress = Progress()
        self.evaluation: Evaluation | None = None  # the last one
        self.parent: ParentRouting | None = None  # rank 0 of an --init-from run: what it drifts from
        self.evaluator = Evaluator(self.engine, val_batches, self.chat, self.shards.tokenizer(), context,
                                   self.cfg.sample_tokens, plan.eval_suite, self.cfg.micro_batch * self.cfg.seq_len)
        self.checkpointer = Checkpointer(plan, context, disks, self.engine, self.shards.manifest.tokenizer,
                                         self.shards.directory, self.expert_ranges, faults)
        self.monitor = TrainingMonitor(plan, context, self.moe_layers, self.chat)

    # ------------------------------------------------------------------ start-up
    def _prepare_default_data(self, prepare_data: Callable[[Path], None] | None) -> None:
        """The default data where the plan found none: prepared by global rank 0 on a shared disk, by each node's
        first rank on node-local disks (where its node lacks it); the others wait."""
        if not any(self.context.gather(self.plan.prepare_default_data)):
            return
        if prepare_data is None:
            raise DataError(f"{self.cfg.data}: no prepared data; prepare it with `python -m data_prep`")

        def prepare() -> None:
            what = "conversations" if self.plan.init_from is not None else "corpus"
            log.warning("%s has no prepared data: preparing the built-in %s first (python -m data_prep)",
                        self.cfg.data, what)
            prepare_data(Path(self.cfg.data))

        self.context.on_ranks(self.disks.writer and self.plan.prepare_default_data, prepare)

    def _verify_data(self) -> None:
        """Rank 0 (each node's first rank on node-local disks) checks every shard against the manifest
        (`gpt_moe.data.verify`, `--verify-data`) and the data's largest token id against the model's vocabulary;
        every node must hold the same data; every rank gets the verdict, before step 1."""
        opened = [shards for shards in (self.shards, self.mix_shards) if shards is not None]
        self.disks.check_same_data(self.context, [(s.directory, s.manifest.content_sha256()) for s in opened])

        def check() -> None:
            for shards in opened:
                found = verify_data(shards, self.cfg.verify_data)
                if found.record is None and found.hashed:
                    log.warning("%s: verification not recorded (%s): every start hashes the shards again",
                                shards.directory, found.record_error)
                if found.max_token_id >= self.plan.model.vocab_size:
                    raise DataError(f"{shards.directory}: token id {found.max_token_id} in the data, but the "
                                    f"model's vocab_size is {self.plan.model.vocab_size}; use a model config with "
                                    f"vocab_size > {found.max_token_id} or data prepared with the model's tokenizer")

        self.context.on_ranks(self.disks.writer, check)

    def _training_batches(self) -> TrainBatches | ChatBatches | MixedBatches:
        """The training rows of this rank: text windows, packed conversations, or both (--mix-pretrain)."""
        cfg, context = self.cfg, self.context
        if self.chat and cfg.mix_pretrain:
            return MixedBatches(self.shards, self.mix_shards, cfg.seq_len, cfg.micro_batch,
                                text_rows(cfg.mix_pretrain, cfg.micro_batch), context.rank, context.world, cfg.seed)
        batches = ChatBatches if self.chat else TrainBatches
        return batches(self.shards, cfg.seq_len, cfg.micro_batch, context.rank, context.world, cfg.seed)

    def _validation_batches(self) -> ValBatches | ChatValBatches | None:
        """The evaluation batches, or None (with one warning) for data prepared with --val-fraction 0."""
        if not self.shards.has_split("val"):
            if self.context.is_rank0:
                log.warning("%s has no validation split (prepared with --val-fraction 0): evaluation is skipped",
                            self.cfg.data)
            return None
        batches = ChatValBatches if self.chat else ValBatches
        return batches(self.shards, self.cfg.seq_len, self.cfg.micro_batch, self.cfg.eval_batches,
                       self.context.rank, self.context.world)

    def _gather_expert_ranges(self) -> list[list[int] | None]:
        """[first, end) of the routed experts each rank holds (the same for every MoE layer)."""
        experts = self.moe_layers[0][1].experts if self.moe_layers else None
        mine = [experts.first_expert, experts.first_expert + experts.num_local_experts] if experts else None
        ranges: list[list[int] | None] = [None] * self.context.world
        dist.all_gather_object(ranges, mine)
        return ranges

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        """Runs grad_accum micro-batches and one optimizer step; returns this rank's mean losses (for chat data
        its share of the global per-token means, times the world size: averaged over ranks, they are those)."""
        sums = torch.zeros(len(LOSS_NAMES), device=self.context.device)  # read once per step (one host sync)
        batches = [self.loader.next_batch() for _ in range(self.cfg.grad_accum)]
        shares = self._token_shares(batches) if self.chat else [None] * len(batches)
        for batch, share in zip(batches, shares):
            out = self.engine(**model_inputs(batch, self.context.device))
            parts = [out.loss, out.lm_loss, out.mtp_loss, out.aux_loss, out.z_loss]
            if share is not None:
                parts = self._per_token_losses(out, *share)
            loss = parts[0]
            if self.progress.step + 1 in self.faults.nan_at:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            sums += torch.stack([p.detach().float() if p is not None else sums.new_zeros(()) for p in parts])
        return dict(zip(LOSS_NAMES, (sums / self.cfg.grad_accum).tolist()))

    def _token_shares(self, batches: list[PackedBatch]) -> list[tuple[float, float]]:
        """Per micro-batch, the factor that turns its mean LM / MTP loss into its share of the mean over every
        trained token of the step (all micro-batches, all ranks), times grad_accum x world (DeepSpeed divides
        by both). A micro-batch with few trained tokens weighs little; one sync per step."""
        counts = torch.tensor([b.trained_tokens() for b in batches], dtype=torch.float64)  # [accum, 2]
        totals = self.context.all_reduce(counts.sum(0)).cpu()
        self.progress.trained_tokens += int(totals[0])
        scale = self.cfg.grad_accum * self.context.world
        return [tuple((counts[i] * scale / totals.clamp(min=1)).tolist()) for i in range(len(batches))]

    def _per_token_losses(self, out, lm_share: float, mtp_share: float) -> list[torch.Tensor | None]:
        """[loss, lm, mtp, aux, z] with lm and mtp weighted by their shares (a mean over no tokens counts 0)."""
        def weighted(loss: torch.Tensor | None, share: float) -> torch.Tensor | None:
            return None if loss is None else (loss * share if share else loss.nan_to_num(0.0) * 0.0)

        lm, mtp = weighted(out.lm_loss, lm_share), weighted(out.mtp_loss, mtp_share)
        loss = lm + (self.plan.model.mtp_loss_weight * mtp if mtp is not None else 0.0)
        for extra in (out.aux_loss, out.z_loss):
            if extra is not None:
                loss = loss + extra
        return [loss, lm, mtp, out.aux_loss, out.z_loss]

    def update_balancing(self, applied: bool) -> torch.Tensor | None:
        """Sums every MoE layer's token counts over all ranks and moves the biases once. Returns the
        global loads [layers, experts] (for logging) or None without MoE layers."""
        if not self.moe_layers:
            return None
        loads = self.context.all_reduce(torch.stack([moe.load_since_update for _, moe in self.moe_layers]))
        for (_, moe), load in zip(self.moe_layers, loads):
            if applied and not self.cfg.freeze_router:
                update_bias(moe.gate, load, self.plan.model.bias_update_rate)
            moe.load_since_update.zero_()
        return loads.cpu()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Trains to the plan's last step (resuming first when the plan says so); returns the summary."""
        from tqdm import tqdm

        self._begin()
        bar = tqdm(total=self.plan.last_step, initial=self.progress.step, disable=not self.context.is_rank0,
                   unit="step", dynamic_ncols=True)
        try:
            self._loop(bar)
        except RuntimeError as err:
            reason = lost_rank_reason(err)
            if reason is None:
                raise
            raise LostRankError(self._lost_rank_message(reason)) from err
        finally:
            bar.close()  # before any error message: the bar's line must not swallow it
        return self._summary()

    def _lost_rank_message(self, reason: str) -> str:
        newest = newest_complete(self.plan.checkpoint_dir)
        return (f"step {self.progress.step + 1}: another rank stopped answering ({reason}): its node died, froze past "
                f"--dist-timeout {self.cfg.dist_timeout:g}s or lost its network; the newest complete checkpoint is "
                f"{newest or 'none'}; rerun the command to resume (on fewer nodes --resume auto converts the layout)")

    def _begin(self) -> None:
        """Resume if the plan says so; write the resolved configs; print the banner; start the clock."""
        client = self.checkpointer.resume(self.resume_source)
        if client is not None:
            self.progress = Progress(client.step, client.tokens_seen, client.trained_tokens, client.bad_steps_total)
            self.loader.load_state_dict(client.data)
        if self.disks.writer:  # every node's: a resume there plans from them
            run_dir = self.plan.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            for name, config in (("ds_config.resolved.json", self.plan.ds_config),
                                 (RUN_CONFIG_FILE, asdict(self.cfg)),
                                 ("model_config.json", self.plan.model.to_dict())):
                write_atomic(run_dir / name, json.dumps(config, indent=2))
        if self.context.is_rank0:
            print(self.plan.banner(), flush=True)
        self.monitor.start()
        if self.plan.init_from is not None and self.evaluator.val_batches is not None:
            self._parent(resumed=client is not None)

    def _parent(self, resumed: bool) -> None:
        """An --init-from run compares its evaluations with its parent: measured before step 1 (with the suite
        off, the validation pass alone), logged at step 0 and kept in the run directory (rank 0); a resumed run
        reads it back."""
        if resumed:
            self.parent = ParentRouting.load(self.plan.run_dir) if self.context.is_rank0 else None
            return
        started = time.perf_counter()
        result = self.evaluator.evaluate(0, validation_only=not self.plan.eval_suite)
        if self.context.is_rank0:
            self.parent = ParentRouting.measured(result, self.engine.module)
            self.parent.save(self.plan.run_dir)
        self.monitor.evaluation(0, result.evaluation, result.sample, time.perf_counter() - started, None)

    def _loop(self, bar) -> None:
        progress, tokens_per_step = self.progress, self.plan.tokens_per_step
        first_step = progress.step + 1
        while progress.step < self.plan.last_step:
            step_start = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            losses = self.train_step()
            if self.cfg.compile and progress.step + 1 == first_step and self.context.is_rank0:
                bar.write(f"--compile: the first step took {time.perf_counter() - step_start:.1f}s, compiling "
                          "included")
            applied = self.engine.skipped_steps == skipped_before
            loads = self.update_balancing(applied)
            progress.step += 1
            progress.tokens_seen += tokens_per_step
            self.monitor.step(tokens_per_step, losses if applied else None, loads)
            if applied:
                progress.bad_steps_in_a_row = 0
            else:
                self._skipped_step(bar)
            if self._due(self.cfg.log_interval):
                self.monitor.log(progress.step, self.engine, time.perf_counter() - step_start,
                                 {"tokens_seen": progress.tokens_seen, "trained_tokens": progress.trained_tokens}, bar)
            if self._due(self.cfg.eval_interval):
                self._evaluate(bar)
            if self._due(self.cfg.save_interval):
                self.save()
                self.monitor.restart_clock()
            bar.update(1)

    def _due(self, interval: int) -> bool:
        return self.progress.step % interval == 0 or self.progress.step == self.plan.last_step

    def _evaluate(self, bar) -> None:
        started = time.perf_counter()
        result = self.evaluator.evaluate(self.progress.step)
        evaluation = result.evaluation
        if self.parent is not None:
            evaluation = self.parent.compare(result, self.engine.module)
        self.evaluation = evaluation
        self.monitor.evaluation(self.progress.step, evaluation, result.sample, time.perf_counter() - started, bar)

    def _skipped_step(self, bar) -> None:
        """A non-finite step: counted; `max_bad_steps` in a row save the last good state and stop."""
        progress = self.progress
        progress.bad_steps_total += 1
        progress.bad_steps_in_a_row += 1
        self.monitor.skipped(progress.step, progress.bad_steps_total, progress.bad_steps_in_a_row, bar)
        if progress.bad_steps_in_a_row >= self.cfg.max_bad_steps:
            path = self.save()  # skipped steps did not touch the weights: this is the last good state
            self._summary()
            raise GptMoeError(f"{progress.bad_steps_in_a_row} non-finite steps in a row (max_bad_steps); "
                              f"stopped, last good state saved to {path}; lower --lr or check the data")

    def save(self) -> Path:
        """A checkpoint of the current step (every rank); its tag directory."""
        p, plan = self.progress, self.plan
        client = ClientState(p.step, p.tokens_seen, self.loader.state_dict(), p.trained_tokens, p.bad_steps_total,
                             asdict(self.cfg), plan.model.to_dict(), plan.ds_config,
                             self.shards.manifest.tokenizer.to_dict(), self.context.world, self.cfg.ep_size)
        return self.checkpointer.save(client, self.evaluation, self.chat)

    def _summary(self) -> dict[str, Any]:
        counters = {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                    "skipped_steps": self.progress.bad_steps_total}
        return self.monitor.summary(counters, self.evaluation, self.expert_ranges, self.init_report,
                                    time.perf_counter() - self.started)

    def close(self) -> None:
        """Flush the logs and take the process group down on every rank together. Leaving it to
        interpreter exit can abort a rank ("terminate called without an active exception") while
        communication threads are still alive."""
        self.monitor.close()
        if self.run_lock is not None:
            self.run_lock.release()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
