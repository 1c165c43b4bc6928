"""The training loop: DeepSpeed engine around the model, balancing, logging, evaluation, checkpoints.

One optimizer step = `grad_accum` micro-batches on every rank. After each applied step the
per-expert token counts of all micro-batches are summed over all ranks and every MoE
layer's bias moves once (aux-loss-free balancing). Non-finite steps are skipped by
DeepSpeed's gradient-overflow check on all ranks and counted; `max_bad_steps` in a row
stop the run after saving the last good state.

    trainer = Trainer(plan_run(...))   # distributed start, engine, data (see gpt_moe.run_plan)
    trainer.run()                      # the loop; returns the summary also written to summary.json
    trainer.close()
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_moe import checkpoint as ckpt
from gpt_moe import reshard
from gpt_moe.atomic import write_atomic
from gpt_moe.chat_data import ChatBatches, ChatValBatches, PackedBatch
from gpt_moe.data import TokenShards, TrainBatches, ValBatches
from gpt_moe.data_verify import verify_data
from gpt_moe.errors import CheckpointError, DataError, GptMoeError
from gpt_moe.hardware import (deepspeed_cuda_arch_list, device_peak_flops, keep_freed_memory, release_freed_memory,
                              unlink_cpu_allreduce_buffer)
from gpt_moe.metrics import Throughput, dashboard_layout, expert_load_stats, make_writer
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.moe import Experts, MoE, update_bias
from gpt_moe.moe_health import CollapseWatch, layer_health
from gpt_moe.params import account
from gpt_moe.peak_flops import cpu_affinity, usable_cores
from gpt_moe.run_plan import RunPlan
from gpt_moe.train_config import FaultInjection, lr_at
from gpt_moe.zero_memory import share_fp32_master

log = logging.getLogger("gpt_moe.train")
LOSS_NAMES = ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss")
SAMPLE_QUESTION = "What does the function len do?"  # asked at each evaluation of a chat fine-tuning run


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with the unique names DeepSpeed's MoE splitting needs; no decay on 1-D parameters (by their
    full shape: a parameter partitioned by `deepspeed.zero.Init` holds an empty 1-D tensor)."""
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def ensure_single_process_env() -> None:
    """What the deepspeed launcher sets, for a one-rank run started with plain `python`."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


class Trainer:
    """One training run on this rank. `prepare_data(directory)` prepares the default corpus when the plan
    says it is missing (rank 0 calls it; the others wait)."""

    def __init__(self, plan: RunPlan, faults: FaultInjection = FaultInjection(),
                 prepare_data: Callable[[Path], None] | None = None) -> None:
        self.plan, self.cfg, self.faults = plan, plan.train, faults
        self.reshard_source: reshard.DeepSpeedSource | reshard.LayoutFreeSource | None = None
        self.resume_from = self.checkpoint_to_resume()  # before anything starts: a refusal costs nothing
        self._start_distributed()
        if plan.prepare_default_data:
            self._prepare_default_data(prepare_data)
        self.shards = TokenShards(self.cfg.data)
        self.shards.check_vocab(plan.model.vocab_size)
        self._verify_data()
        self.chat = self.shards.content == "chat"  # fine-tuning on conversations: packed rows, trained tokens
        batches = ChatBatches if self.chat else TrainBatches
        self.loader = batches(self.shards, self.cfg.seq_len, self.cfg.micro_batch, self.rank, self.world,
                              self.cfg.seed)
        self.val_batches = self._validation_batches()
        self.engine = self._build_engine()
        if self.device.type == "cpu":
            release_freed_memory()  # what building the engine freed (see there)
        self.moe_layers: list[tuple[int, MoE]] = self.engine.module.moe_layers()
        self.expert_ranges = self._gather_expert_ranges()
        self.step = self.tokens_seen = self.trained_tokens = self.bad_steps_total = self.bad_steps_in_a_row = 0
        self.last_val_loss = float("nan")
        self.last_mtp_acceptance: float | None = None
        self.history: list[dict[str, float]] = []
        self.writer = make_writer(str(plan.run_dir / "tensorboard"), self.is_rank0)

    # ------------------------------------------------------------------ start-up
    def _start_distributed(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        ensure_single_process_env()
        accelerator = get_accelerator()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank0 = self.rank == 0
        self.device = torch.device(accelerator.current_device_name())
        if self.device.type == "cpu" and self.plan.zero_stage < 3:
            # reuse freed activations instead of faulting fresh pages in every step; not under ZeRO-3, the stage
            # for models that barely fit: the heap it keeps grew a `small` EP=2 rank past 10 GiB (killed) where it
            # peaks at 7.7 GiB with glibc's defaults
            keep_freed_memory()
        if self.device.type == "cpu":
            dist.barrier()  # every rank has mapped every rank's allreduce workspace: its name can go
            unlink_cpu_allreduce_buffer(self.rank)
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if self.device.type == "cuda" and deepspeed_cuda_arch_list(arch_list) != arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_cuda_arch_list(arch_list)  # before FusedAdam is built
            log.warning("TORCH_CUDA_ARCH_LIST=%s rewritten as %s for DeepSpeed's op builder", arch_list,
                        os.environ["TORCH_CUDA_ARCH_LIST"])

    def _prepare_default_data(self, prepare_data: Callable[[Path], None] | None) -> None:
        if prepare_data is None:
            raise DataError(f"{self.cfg.data}: no prepared data; prepare it with `python -m data_prep`")
        if self.is_rank0:
            what = "conversations" if self.plan.pretrained is not None else "corpus"
            log.warning("%s has no prepared data: preparing the built-in %s first (python -m data_prep)",
                        self.cfg.data, what)
            prepare_data(Path(self.cfg.data))
        dist.barrier()

    def _verify_data(self) -> None:
        """Rank 0 checks every shard against the manifest (`gpt_moe.data_verify`, `--verify-data`) and the data's
        largest token id against the model's vocabulary; every rank gets the verdict, before step 1."""
        verdict: list[str | None] = [None]
        if self.is_rank0:
            try:
                check = verify_data(self.shards, self.cfg.verify_data)
                if check.record is None and check.hashed:
                    log.warning("%s: verification not recorded (%s): every start hashes the shards again",
                                self.cfg.data, check.record_error)
                if check.max_token_id >= self.plan.model.vocab_size:
                    verdict = [f"{self.cfg.data}: token id {check.max_token_id} in the data, but the model's "
                               f"vocab_size is {self.plan.model.vocab_size}; use a model config with vocab_size > "
                               f"{check.max_token_id} or data prepared with the model's tokenizer"]
            except DataError as err:
                verdict = [str(err)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise DataError(verdict[0])

    def _validation_batches(self) -> ValBatches | ChatValBatches | None:
        """The evaluation batches, or None (with one warning) for data prepared with --val-fraction 0."""
        if not self.shards.has_split("val"):
            if self.is_rank0:
                log.warning("%s has no validation split (prepared with --val-fraction 0): evaluation is skipped",
                            self.cfg.data)
            return None
        batches = ChatValBatches if self.chat else ValBatches
        return batches(self.shards, self.cfg.seq_len, self.cfg.micro_batch, self.cfg.eval_batches, self.rank,
                       self.world)

    def _build_engine(self):
        import deepspeed

        expert_parallel = None
        if self.cfg.ep_size > 1:
            from gpt_moe.expert_parallel import setup_expert_parallel
            expert_parallel = setup_expert_parallel(self.cfg.ep_size, self.plan.zero_stage)
        # ZeRO-3 builds each module's parameters already partitioned (a rank never holds the whole model);
        # --init-from loads whole tensors into an ordinary model first
        partitioned = self.plan.zero_stage == 3 and self.plan.pretrained is None
        with deepspeed.zero.Init(config_dict_or_path=self.plan.ds_config, enabled=partitioned):
            model = DeepSeekForCausalLM(self.plan.model, expert_parallel, seed=self.cfg.seed)
        if partitioned and self.device.type == "cpu":
            release_freed_memory()  # the whole parameters zero.Init replaced by partitions (small: 3.5 -> 1.9 GiB)
        model.set_activation_checkpointing(self.cfg.activation_checkpointing)
        if self.plan.pretrained is not None:
            self._load_pretrained(model)
        if self.cfg.freeze_router:
            for _, moe in model.moe_layers():
                moe.gate.weight.requires_grad_(False)  # the bias is a buffer: update_balancing leaves it alone
        if self.plan.zero_stage == 3:
            deepspeed.utils.set_z3_leaf_modules(model, [MoE])  # fetch a whole MoE block at once
        cfg = self.cfg
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=self.plan.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)))
        if not self.plan.bf16:
            share_fp32_master(engine.optimizer)  # ZeRO-3 fp32: the master weights are the parameters
        if hasattr(engine.optimizer, "check_grad_overflow"):
            engine.optimizer.check_grad_overflow = True  # skip non-finite steps in fp32 runs too
        return engine

    def _load_pretrained(self, model: DeepSeekForCausalLM) -> None:
        """--init-from: the weights (read without unpickling code), this rank's share of the routed experts under
        expert parallelism. A transformers directory has no MTP block: it keeps its fresh initialisation."""
        base = self.plan.pretrained
        state = base.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, Experts):
                for weight in ("gate_up_proj", "down_proj"):
                    key = f"{name}.{weight}"
                    if key in state:
                        state[key] = state[key][module.first_expert:module.first_expert + module.num_local_experts]
        missing, unexpected = model.load_state_dict(state, strict=False)
        mtp = f"model.layers.{self.plan.model.num_hidden_layers}."
        if unexpected or any(not key.startswith(mtp) for key in missing):
            raise CheckpointError(f"{base.source}: weights do not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        if missing and self.is_rank0:
            log.warning("%s has no MTP block: it starts from a fresh initialisation", base.source)
        if self.is_rank0:
            log.warning("initialised from %s (%s); optimizer and schedule start fresh", base.source, base.kind)

    def _gather_expert_ranges(self) -> list[list[int] | None]:
        """[first, end) of the routed experts each rank holds (the same for every MoE layer)."""
        experts = self.moe_layers[0][1].experts if self.moe_layers else None
        mine = [experts.first_expert, experts.first_expert + experts.num_local_experts] if experts else None
        ranges: list[list[int] | None] = [None] * self.world
        dist.all_gather_object(ranges, mine)
        return ranges

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        tag = ckpt.tag_for_step(self.step)
        client = {
            "step": self.step, "tokens_seen": self.tokens_seen, "trained_tokens": self.trained_tokens,
            "data": self.loader.state_dict(),
            "bad_steps_total": self.bad_steps_total, "train_config": asdict(self.cfg),
            "model_config": self.plan.model.to_dict(), "ds_config": self.plan.ds_config,
            "tokenizer": self.shards.manifest.tokenizer.to_dict(), "world_size": self.world,
            "ep_size": self.cfg.ep_size,
        }
        tag_dir = self.plan.checkpoint_dir / tag
        failure: BaseException | None = None
        try:
            self.engine.save_checkpoint(str(self.plan.checkpoint_dir), tag=tag, client_state=client)
            ckpt.save_rank_state(tag_dir, self.rank)
            if self.step == self.faults.full_disk_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
        except (OSError, RuntimeError) as err:  # a full disk surfaces as either (torch.save: "unexpected pos")
            failure = err
        if self.step == self.faults.kill_during_save_at and self.is_rank0:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the tests: die before COMPLETE
        if self._all_reduce(torch.tensor([float(failure is not None)])).item():  # also the "all written" barrier
            self._abandon_save(tag_dir, failure)
        if self.is_rank0:
            self._mark_complete(tag_dir)
        dist.barrier()
        return tag_dir

    def _abandon_save(self, tag_dir: Path, failure: BaseException | None) -> None:
        """A save failed on some rank: remove the partial tag, keep the complete ones, stop with one line."""
        if self.is_rank0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        why = ckpt.describe_save_failure(failure, self.plan.checkpoint_dir) if failure else "failed on another rank"
        newest = ckpt.newest_complete(self.plan.checkpoint_dir)
        raise GptMoeError(f"{tag_dir}: saving the checkpoint failed ({why}); the partial checkpoint was removed and "
                          f"the newest complete one is {newest or 'none'}; free space or fix the permissions, then "
                          "rerun the same command to resume")

    def _mark_complete(self, tag_dir: Path) -> None:
        ckpt.save_inference_files(tag_dir, self.plan.model, self.shards.manifest.tokenizer, self.shards.directory)
        ckpt.mark_complete(tag_dir, {
            "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
            "ep_size": self.cfg.ep_size, "expert_ranges": self.expert_ranges, "zero_stage": self.plan.zero_stage,
            "bf16": self.plan.bf16, "val_loss": self.last_val_loss, "model": self.plan.model.name,
            "chat": self.chat, "mtp_acceptance": self.last_mtp_acceptance,
            "init_from": str(self.plan.pretrained.source) if self.plan.pretrained else None})
        ckpt.prune(self.plan.checkpoint_dir, self.cfg.keep_last)

    def checkpoint_to_resume(self) -> Path | None:
        """The complete checkpoint `--resume` points at (None: start fresh), read before any engine is built:
        when its layout differs from this run's, the resharding source is opened (and checked) here."""
        cfg = self.cfg
        if cfg.resume == "none":
            return None
        if cfg.resume == "auto":
            tag_dir = ckpt.newest_complete(self.plan.checkpoint_dir)
        else:  # a tag directory, or a run directory: its newest complete checkpoint
            tag_dir = ckpt.newest_complete(Path(cfg.resume) / "checkpoints") or Path(cfg.resume)
        if tag_dir is None:
            return None
        info = ckpt.read_complete_info(tag_dir)
        saved = {"world_size": info["world_size"], "ep_size": info["ep_size"], "zero_stage": info["zero_stage"],
                 "bf16": info.get("bf16", self.plan.bf16)}
        self.layout = {"world_size": self.plan.world_size, "ep_size": cfg.ep_size, "zero_stage": self.plan.zero_stage,
                       "bf16": self.plan.bf16}
        if reshard.is_layout_free(tag_dir) or saved != self.layout:
            self.reshard_source = reshard.open_source(tag_dir)  # reads records only; refuses inconsistent experts
        else:
            ckpt.check_data_only(tag_dir)  # before DeepSpeed's loader, which would run pickled code
        return tag_dir

    def resume(self, tag_dir: Path) -> None:
        """The same layout: DeepSpeed's own loader. Another one (ranks, EP size, ZeRO stage, precision) or a
        layout-free checkpoint: `gpt_moe.reshard` puts the state into this engine parameter by parameter."""
        source = self.reshard_source
        if source is not None:
            if self.is_rank0:
                log.warning("%s: converting from %s to %s", tag_dir, reshard.describe_layout(source.info),
                            reshard.describe_layout(self.layout))
            client = reshard.load_into_engine(self.engine, source, self.cfg.seed)
        else:
            _, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            ckpt.load_rank_state(tag_dir, self.rank)
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.trained_tokens = client.get("trained_tokens", 0)
        self.bad_steps_total = client.get("bad_steps_total", 0)
        self.loader.load_state_dict(client["data"])
        if self.is_rank0:
            log.warning("resumed from %s at step %d (%d tokens seen)", tag_dir, self.step, self.tokens_seen)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        """Runs grad_accum micro-batches and one optimizer step; returns this rank's mean losses (for chat data
        its share of the global per-token means, times the world size: averaged over ranks, they are those)."""
        sums = torch.zeros(len(LOSS_NAMES), device=self.device)  # read once per step (one host sync)
        batches = [self.loader.next_batch() for _ in range(self.cfg.grad_accum)]
        shares = self._token_shares(batches) if self.chat else [None] * len(batches)
        for batch, share in zip(batches, shares):
            out = self.engine(**self._model_inputs(batch))
            parts = [out.loss, out.lm_loss, out.mtp_loss, out.aux_loss, out.z_loss]
            if share is not None:
                parts = self._per_token_losses(out, *share)
            loss = parts[0]
            if self.step + 1 in self.faults.nan_at:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            sums += torch.stack([p.detach().float() if p is not None else sums.new_zeros(()) for p in parts])
        return dict(zip(LOSS_NAMES, (sums / self.cfg.grad_accum).tolist()))

    def _model_inputs(self, batch) -> dict[str, torch.Tensor]:
        if self.chat:
            return batch.to(self.device).model_inputs()
        inputs, labels = batch
        return {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}

    def _token_shares(self, batches: list[PackedBatch]) -> list[tuple[float, float]]:
        """Per micro-batch, the factor that turns its mean LM / MTP loss into its share of the mean over every
        trained token of the step (all micro-batches, all ranks), times grad_accum x world (DeepSpeed divides
        by both). A micro-batch with few trained tokens weighs little; one sync per step."""
        counts = torch.tensor([b.trained_tokens() for b in batches], dtype=torch.float64)  # [accum, 2]
        totals = self._all_reduce(counts.sum(0)).cpu()
        self.trained_tokens += int(totals[0])
        scale = self.cfg.grad_accum * self.world
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
        loads = self._all_reduce(torch.stack([moe.load_since_update for _, moe in self.moe_layers]))
        for (_, moe), load in zip(self.moe_layers, loads):
            if applied and not self.cfg.freeze_router:
                update_bias(moe.gate, load, self.plan.model.bias_update_rate)
            moe.load_since_update.zero_()
        return loads.cpu()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation LM loss: the mean over batches, or for chat data over trained tokens."""
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for batch in self.val_batches:
            out = self.engine(**self._model_inputs(batch))
            weight = batch.trained_tokens()[0] if self.chat else 1
            if weight:
                total += torch.tensor([out.lm_loss.item() * weight, weight], dtype=torch.float64)
        self.engine.train()
        total = self._all_reduce(total).cpu()
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    @torch.no_grad()
    def mtp_acceptance(self) -> float | None:
        """Teacher-forced share of validation positions where the MTP block's top token for the token after next
        is the main model's (`gpt_moe.mtp_acceptance`); None without an MTP block or counted positions."""
        from gpt_moe.mtp_acceptance import mtp_agreement

        if not self.plan.model.num_nextn_predict_layers:
            return None
        self.engine.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for batch in self.val_batches:  # every rank calls the model together (experts and ZeRO-3 shards are shared)
            counts += mtp_agreement(self.engine.module, **self._model_inputs(batch)).cpu().double()
        self.engine.train()
        counts = self._all_reduce(counts).cpu()
        return (counts[0] / counts[1]).item() if counts[1] > 0 else None

    @torch.no_grad()
    def sample_text(self) -> str:
        """Greedy continuation of a fixed prompt (all ranks run it: experts and ZeRO-3 shards are shared)."""
        from gpt_moe.chat import format_chat
        from gpt_moe.generate import greedy_uncached

        tokenizer = self.shards.tokenizer()
        if self.chat:  # a reply through the chat template
            prompt = format_chat(tokenizer, [{"role": "user", "content": SAMPLE_QUESTION}])
        else:
            prompt = tokenizer.encode_ordinary("def ")
        self.engine.eval()
        ids = greedy_uncached(self.engine.module, torch.tensor([prompt], device=self.device), self.cfg.sample_tokens,
                              vocab_limit=tokenizer.n_vocab)
        self.engine.train()
        text = tokenizer.decode(ids[0].tolist())
        return f"{SAMPLE_QUESTION} -> {text.split('<|assistant|>', 1)[-1]}" if self.chat else text

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Trains to the plan's last step (resuming first when a checkpoint was found); returns the summary."""
        from tqdm import tqdm

        self._begin()
        bar = tqdm(total=self.plan.last_step, initial=self.step, disable=not self.is_rank0, unit="step",
                   dynamic_ncols=True)
        try:
            self._loop(bar)
        finally:
            bar.close()  # before any error message: the bar's line must not swallow it
        return self._write_summary()

    def _loop(self, bar) -> None:
        window, window_loads = LossWindow(), None
        while self.step < self.plan.last_step:
            step_start = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            losses = self.train_step()
            applied = self.engine.skipped_steps == skipped_before
            loads = self.update_balancing(applied)
            if loads is not None:  # summed over the log window (skipped steps routed tokens too)
                window_loads = loads if window_loads is None else window_loads + loads
            self.step += 1
            self.tokens_seen += self.plan.tokens_per_step
            self.throughput.add(self.plan.tokens_per_step)
            if applied:
                self.bad_steps_in_a_row = 0
                window.add(losses)
            else:
                self._skipped_step(bar)
            step_time = time.perf_counter() - step_start
            if self._due(self.cfg.log_interval):
                self._log(window, window_loads, step_time, bar)
                window_loads = None
            if self._due(self.cfg.eval_interval):
                self._evaluate_and_sample(bar)
            if self._due(self.cfg.save_interval):
                self.save()
                self.throughput.restart()
            bar.update(1)

    def _begin(self) -> None:
        """Resume if there is a checkpoint; write the resolved configs; print the banner; start the clock."""
        if self.resume_from is not None:
            self.resume(self.resume_from)
        if self.is_rank0:
            run_dir = self.plan.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.resolved.json").write_text(json.dumps(self.plan.ds_config, indent=2))
            (run_dir / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
            (run_dir / "model_config.json").write_text(json.dumps(self.plan.model.to_dict(), indent=2))
            print(self.plan.banner(), flush=True)
        self.bias_at_log = [moe.gate.e_score_correction_bias.detach().cpu().clone() for _, moe in self.moe_layers]
        self.collapse = CollapseWatch(self.cfg.collapse_windows)
        self.writer.add_custom_scalars(dashboard_layout([layer for layer, _ in self.moe_layers]))
        peak, how = self._peak_flops()
        if self.is_rank0:
            log.warning("MFU divides by a peak of %.4g FLOP/s (%s)", peak, how)
        self.throughput = Throughput(account(self.plan.model, self.cfg.seq_len).flops_per_token, peak, how,
                                     warn=self.is_rank0)

    def _peak_flops(self) -> tuple[float, str]:
        """(the run's total peak FLOP/s, how rank 0's share was obtained): per GPU the table (or --peak-flops),
        summed over ranks. On CPU the ranks of one host share its cores, so one of them (the first) measures
        for the host with the threads they use together (at most the cores they may run on) while the others
        wait; one measurement per host is reproducible and cached (`gpt_moe.peak_flops`), where ranks measuring
        at the same time would split the cores unevenly. Hosts' peaks are summed."""
        dtype = torch.bfloat16 if self.plan.bf16 else torch.float32
        host, threads, cores = socket.gethostname(), torch.get_num_threads(), usable_cores()
        ranks: list[tuple[str, int, set[int]]] = [("", 0, set())] * self.world
        dist.all_gather_object(ranks, (host, threads, cores))
        mine = [r for r in ranks if r[0] == host]
        first_of_host = next(i for i, r in enumerate(ranks) if r[0] == host)
        peak, how = 0.0, "another rank of this host measures for it"
        if self.device.type != "cpu" or first_of_host == self.rank:
            if self.cfg.peak_flops:
                peak, how = self.cfg.peak_flops, "--peak-flops"
            elif self.device.type != "cpu":
                peak, how = device_peak_flops(self.device, dtype)
            else:
                host_cores = set().union(*(r[2] for r in mine))
                with cpu_affinity(host_cores):
                    peak, how = device_peak_flops(self.device, dtype, min(len(host_cores), sum(r[1] for r in mine)))
        return self._all_reduce(torch.tensor([peak], dtype=torch.float64)).item(), how

    def _due(self, interval: int) -> bool:
        return self.step % interval == 0 or self.step == self.plan.last_step

    def _skipped_step(self, bar) -> None:
        """A non-finite step: counted; `max_bad_steps` in a row save the last good state and stop."""
        self.bad_steps_total += 1
        self.bad_steps_in_a_row += 1
        self.writer.add_scalar("train/skipped_steps", self.bad_steps_total, self.step)
        if self.is_rank0:
            bar.write(f"step {self.step}: non-finite loss or gradients, step skipped on all ranks "
                      f"({self.bad_steps_in_a_row} in a row)")
        if self.bad_steps_in_a_row >= self.cfg.max_bad_steps:
            path = self.save()  # skipped steps did not touch the weights: this is the last good state
            self._write_summary()
            raise GptMoeError(f"{self.bad_steps_in_a_row} non-finite steps in a row (max_bad_steps); "
                              f"stopped, last good state saved to {path}; lower --lr or check the data")

    def _log(self, window: LossWindow, loads: torch.Tensor | None, step_time: float, bar) -> None:
        """Scalars of the window since the last log (mean over ranks) to TensorBoard, metrics.jsonl, the bar.
        loads: [layers, experts] tokens per routed expert over the window (all ranks), or None."""
        mean = self._all_reduce(window.mean()).cpu() / self.world
        window.reset()
        perf = self.throughput.read_and_reset()
        scalars = {f"train/{name}": value.item() for name, value in zip(LOSS_NAMES, mean)}
        scalars.update({"train/lr": self.engine.get_lr()[0],
                        "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                        "perf/tokens_per_sec": perf["tokens_per_sec"], "perf/mfu": perf["mfu"],
                        "perf/step_time": step_time, "perf/memory_gb": _memory_gb(self.device),
                        "train/tokens_seen": self.tokens_seen})
        if self.chat:
            scalars["train/trained_tokens"] = self.trained_tokens
        if loads is not None:
            scalars.update(self._expert_scalars(loads, bar))
        record: dict[str, Any] = {"step": self.step, **scalars}
        if loads is not None:  # the window's load vectors: metrics.jsonl and summary.json, not TensorBoard
            record["expert_loads"] = {str(layer): load.tolist() for (layer, _), load in zip(self.moe_layers, loads)}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, self.step)
        self.history.append(record)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", tok_s=f"{perf['tokens_per_sec']:.0f}",
                        mfu="wrong peak" if perf["wrong_peak"] else f"{perf['mfu']:.1%}", refresh=False)
        if self.is_rank0:
            with open(self.plan.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _expert_scalars(self, loads: torch.Tensor, bar) -> dict[str, float]:
        """Per MoE layer: load spread and health (`gpt_moe.moe_health`) of the window, as scalars; the load
        histogram to TensorBoard; the collapse warning (bar, log, TensorBoard text) when a layer collapses."""
        routing, rows = self._read_routing_window()
        scalars: dict[str, float] = {}
        for i, ((layer, moe), load) in enumerate(zip(self.moe_layers, loads)):
            bias = moe.gate.e_score_correction_bias.detach().cpu()
            health = layer_health(load, routing[i], bias, self.bias_at_log[i], rows[:, i] if rows is not None else None)
            self.bias_at_log[i] = bias.clone()
            stats = {**expert_load_stats(load), "bias_range": (bias.max() - bias.min()).item(), **health}
            scalars.update({f"experts/layer{layer}_{name}": value for name, value in stats.items()})
            self.writer.add_histogram(f"experts/layer{layer}_load", load, self.step)
            warning = self.collapse.update(layer, int(health["dead"]), load.numel(), self.step)
            if warning and self.is_rank0:
                bar.write(f"warning: {warning}")
                self.writer.add_text("experts/collapse", warning, self.step)
        return scalars

    def _read_routing_window(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per MoE layer [layers, 2]: router entropy sum and tokens over the window, summed over ranks;
        [world, layers] token rows each rank's experts processed, with expert parallelism, else None). Resets
        the layers' window counters. Two collectives per log, none per step."""
        local = torch.stack([moe.routing_since_log for _, moe in self.moe_layers])
        rows = torch.stack([moe.experts.rows_since_log for _, moe in self.moe_layers])
        for _, moe in self.moe_layers:
            moe.routing_since_log.zero_()
            moe.experts.rows_since_log.zero_()
        routing = self._all_reduce(local.double()).cpu()
        if self.cfg.ep_size == 1:
            return routing, None
        gathered = [torch.zeros_like(rows) for _ in range(self.world)]
        dist.all_gather(gathered, rows)
        return routing, torch.stack(gathered).cpu()

    def _evaluate_and_sample(self, bar) -> None:
        if self.val_batches is not None:
            self.last_val_loss = self.evaluate()
            ppl = math.exp(min(self.last_val_loss, 50))
            self.writer.add_scalar("val/loss", self.last_val_loss, self.step)
            self.writer.add_scalar("val/ppl", ppl, self.step)
            if self.is_rank0:
                bar.write(f"step {self.step}: val loss {self.last_val_loss:.4f} (ppl {ppl:.1f})")
            self.last_mtp_acceptance = self.mtp_acceptance()
            if self.last_mtp_acceptance is not None:
                self.writer.add_scalar("eval/mtp_acceptance", self.last_mtp_acceptance, self.step)
                if self.is_rank0:
                    bar.write(f"step {self.step}: MTP draft acceptance {self.last_mtp_acceptance:.1%}")
        if self.cfg.sample_tokens:
            self.writer.add_text("sample", self.sample_text(), self.step)
        self.throughput.restart()  # keep evaluation out of the throughput window

    def _write_summary(self) -> dict[str, Any]:
        """runs/<run>/summary.json: per-logged-step scalars, final validation loss, layout."""
        self.writer.flush()
        peaks = [0.0] * self.world
        dist.all_gather_object(peaks, peak_memory_gib(self.device))
        result = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": self.last_val_loss,
                  "skipped_steps": self.bad_steps_total, "peak_memory_gib": peaks,
                  "layout": {"world_size": self.world, "ep_size": self.cfg.ep_size,
                             "expert_ranges": self.expert_ranges},
                  "history": self.history}
        if self.is_rank0:
            write_atomic(self.plan.run_dir / "summary.json", json.dumps(result, indent=1))
        return result

    def close(self) -> None:
        """Flush the logs and take the process group down on every rank together. Leaving it to
        interpreter exit can abort a rank ("terminate called without an active exception") while
        communication threads are still alive."""
        self.writer.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class LossWindow:
    """Sums of the applied steps' losses since the last log ([loss, lm, mtp, aux, z])."""

    def __init__(self) -> None:
        self.sums, self.steps = torch.zeros(len(LOSS_NAMES)), 0

    def add(self, losses: dict[str, float]) -> None:
        self.sums += torch.tensor([losses[name] for name in LOSS_NAMES])
        self.steps += 1

    def mean(self) -> torch.Tensor:
        return self.sums / max(self.steps, 1)

    def reset(self) -> None:
        self.sums.zero_()
        self.steps = 0


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    import psutil

    return psutil.Process().memory_info().rss / 1024 ** 3


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory so far: torch.cuda.max_memory_allocated on a GPU; on CPU the peak resident set
    (getrusage ru_maxrss: every page the process ever had resident, the Python interpreter and libraries
    included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux
