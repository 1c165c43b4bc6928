"""The training loop: DeepSpeed engine around the model, balancing, logging, evaluation, checkpoints.

One optimizer step = `grad_accum` micro-batches on every rank. After each applied step the
per-expert token counts of all micro-batches are summed over all ranks and every MoE
layer's bias moves once (aux-loss-free balancing). Non-finite steps are skipped by
DeepSpeed's gradient-overflow check on all ranks and counted; `max_bad_steps` in a row
stop the run after saving the last good state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpt_moe import checkpoint as ckpt
from gpt_moe.config import ModelConfig
from gpt_moe.data import TokenShards, TrainBatches, ValBatches
from gpt_moe.ds_config import TrainingShape, load_ds_config, resolve_ds_config, zero_stage
from gpt_moe.errors import ConfigError, DataError, GptMoeError
from gpt_moe.hardware import device_peak_flops, keep_freed_memory, native_bf16
from gpt_moe.metrics import Throughput, expert_load_stats, make_writer
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.moe import MoE, update_bias
from gpt_moe.params import account, describe
from gpt_moe.train_config import TrainConfig, lr_at

log = logging.getLogger("gpt_moe.train")
DEFAULT_DATA = "data/builtin"


# ---------------------------------------------------------------------- setup, before any heavy work
def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    model_config = ModelConfig.load(cfg.model)
    overrides = {key: value for key, value in (("mtp_loss_weight", cfg.mtp_weight),
                                               ("bias_update_rate", cfg.bias_update_rate),
                                               ("seq_aux_loss_coef", cfg.seq_aux_loss_coef)) if value is not None}
    return model_config.replace(**overrides) if overrides else model_config


def check_layout(cfg: TrainConfig, model_config: ModelConfig, world_size: int) -> None:
    """Expert-parallel size must divide both the world and the number of routed experts."""
    if world_size % cfg.ep_size:
        raise ConfigError(f"--ep-size {cfg.ep_size} does not divide the world size {world_size}; "
                          f"use a divisor of {world_size}")
    if model_config.n_routed_experts % cfg.ep_size:
        raise ConfigError(f"--ep-size {cfg.ep_size} does not divide n_routed_experts="
                          f"{model_config.n_routed_experts} of model {model_config.name!r}")


def check_data(cfg: TrainConfig) -> bool:
    """True if the data must be prepared first (only the default directory is prepared automatically)."""
    if (Path(cfg.data) / "manifest.json").is_file():
        return False
    if Path(cfg.data) == Path(DEFAULT_DATA):
        return True
    raise DataError(f"{cfg.data}: no prepared data (manifest.json missing); prepare it with "
                    f"`python -m data_prep --out {cfg.data} ...` or omit --data to use the built-in corpus")


def run_dir_for(cfg: TrainConfig, model_config: ModelConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / model_config.name


def estimate_memory_gb(model_config: ModelConfig, cfg: TrainConfig, stage: int, world: int) -> dict[str, float]:
    """Per-rank model-state memory (bf16 weights 2 B, fp32 grads 4 B, fp32 master + Adam 12 B per
    parameter; ZeRO-1 shards the 12, ZeRO-2 also the grads, ZeRO-3 everything over the data-parallel
    ranks; routed experts first divided by the EP size) and a rough activation figure."""
    a = account(model_config, cfg.seq_len)
    total = a.total_params + a.mtp_params
    expert = 3 * model_config.hidden_size * model_config.moe_intermediate_size * model_config.n_routed_experts \
        * (model_config.num_moe_layers + model_config.num_nextn_predict_layers)
    per_rank = total - expert + expert / cfg.ep_size
    weights, grads, optim = 2 * per_rank, 4 * per_rank, 12 * per_rank
    optim /= world if stage >= 1 else 1
    grads /= world if stage >= 2 else 1
    weights /= world if stage >= 3 else 1
    layers = model_config.num_hidden_layers + model_config.num_nextn_predict_layers
    activations = 34 * cfg.seq_len * cfg.micro_batch * model_config.hidden_size * layers  # bf16, no recompute
    logits = 6 * cfg.seq_len * cfg.micro_batch * model_config.vocab_size * (1 + model_config.num_nextn_predict_layers)
    gib = 1024 ** 3
    return {"weights": weights / gib, "grads": grads / gib, "optimizer": optim / gib,
            "activations": (activations + logits) / gib}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with the unique names DeepSpeed's MoE splitting needs; no decay on 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
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


# ---------------------------------------------------------------------- the run
class Trainer:
    def __init__(self, cfg: TrainConfig, explicit: frozenset[str], inject_nan_at: set[int] | None = None,
                 kill_during_save_at: int = -1) -> None:
        self.cfg = cfg
        self.inject_nan_at = inject_nan_at or set()  # fault injection (tests): these steps get a NaN loss
        self.kill_during_save_at = kill_during_save_at
        # everything that can be wrong with the input fails here, before deepspeed is even imported
        self.model_config = resolve_model_config(cfg)
        raw_ds = load_ds_config(cfg.deepspeed_config)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_layout(cfg, self.model_config, world)
        must_prepare = check_data(cfg)

        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        bf16_supported = accelerator.is_bf16_supported()
        self.shape = TrainingShape(cfg.micro_batch, cfg.grad_accum, world, cfg.lr, cfg.weight_decay, cfg.clip,
                                   bf16_supported, self.model_config.hidden_size, explicit,
                                   bf16_native=native_bf16(accelerator.device_name(), bf16_supported))
        self.ds_config = resolve_ds_config(raw_ds, self.shape, source=cfg.deepspeed_config)
        cfg.micro_batch, cfg.grad_accum, cfg.clip = self.shape.micro_batch, self.shape.grad_accum, self.shape.clip
        cfg.lr, cfg.weight_decay = self.shape.lr, self.shape.weight_decay
        self.stage = zero_stage(self.ds_config)
        self.run_dir = run_dir_for(cfg, self.model_config)
        self.checkpoint_dir = self.run_dir / "checkpoints"

        if cfg.dry_run:
            self.world, self.rank = world, 0
            return
        ensure_single_process_env()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank0 = self.rank == 0
        self.device = torch.device(accelerator.current_device_name())
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed activations instead of faulting fresh pages in every step
        self.resume_from = self.checkpoint_to_resume()
        if must_prepare:
            self._prepare_default_data()
        self.shards = TokenShards(cfg.data)
        self.shards.check_vocab(self.model_config.vocab_size)

        expert_parallel = None
        if cfg.ep_size > 1:
            from gpt_moe.expert_parallel import setup_expert_parallel
            expert_parallel = setup_expert_parallel(cfg.ep_size, self.stage)
        self.expert_parallel = expert_parallel
        model = DeepSeekForCausalLM(self.model_config, expert_parallel, seed=cfg.seed)
        if self.stage == 3:
            deepspeed.utils.set_z3_leaf_modules(model, [MoE])  # fetch a whole MoE block at once
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)))
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            self.engine.optimizer.check_grad_overflow = True  # skip non-finite steps in fp32 runs too
        self.moe_names = [name.split(".")[2] for name, m in self.engine.module.named_modules() if isinstance(m, MoE)]
        self.moe_layers = [m for m in self.engine.module.modules() if isinstance(m, MoE)]  # model.layers.{i}.mlp
        experts = self.moe_layers[0].experts if self.moe_layers else None
        mine = [experts.first_expert, experts.first_expert + experts.num_local_experts] if experts else None
        self.expert_ranges: list[list[int] | None] = [None] * self.world  # [first, end) of each rank's experts
        dist.all_gather_object(self.expert_ranges, mine)
        self.loader = TrainBatches(self.shards, cfg.seq_len, cfg.micro_batch, self.rank, self.world, cfg.seed)
        self.val_batches = ValBatches(self.shards, cfg.seq_len, cfg.micro_batch, cfg.eval_batches, self.rank,
                                      self.world)
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps_total = 0
        self.bad_steps_in_a_row = 0
        self.last_val_loss = float("nan")
        self.writer = make_writer(str(self.run_dir / "tensorboard"), self.is_rank0)

    # ------------------------------------------------------------------ helpers
    def _prepare_default_data(self) -> None:
        if self.is_rank0:
            log.warning("%s has no prepared data: preparing the built-in corpus first (python -m data_prep)",
                        self.cfg.data)
            from data_prep.__main__ import main as data_prep_main
            code = data_prep_main(["--source", "builtin", "--out", self.cfg.data])
            if code:
                raise DataError(f"{self.cfg.data}: preparing the built-in corpus failed (exit {code})")
        dist.barrier()

    def banner(self) -> str:
        a = account(self.model_config, self.cfg.seq_len)
        memory = estimate_memory_gb(self.model_config, self.cfg, self.stage, self.world)
        lines = [
            "=" * 72,
            f"gpt-moe training  run dir {self.run_dir}",
            f"world {self.world} rank(s), expert-parallel size {self.cfg.ep_size} "
            f"({self.model_config.n_routed_experts // self.cfg.ep_size} routed experts per rank per layer), "
            f"ZeRO stage {self.stage}, bf16 {self.ds_config['bf16']['enabled']}",
            describe(a),
            "memory per rank (estimate, GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in memory.items()),
            "model config: " + json.dumps({k: v for k, v in self.model_config.to_dict().items() if k != "extra"}),
            "training config: " + json.dumps(asdict(self.cfg)),
            "DeepSpeed config (resolved): " + json.dumps(self.ds_config),
            "=" * 72,
        ]
        return "\n".join(lines)

    def _all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, op=op)
        return values

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        tag = ckpt.tag_for_step(self.step)
        client = {
            "step": self.step, "tokens_seen": self.tokens_seen, "data": self.loader.state_dict(),
            "bad_steps_total": self.bad_steps_total, "train_config": asdict(self.cfg),
            "model_config": self.model_config.to_dict(), "ds_config": self.ds_config,
            "tokenizer": self.shards.manifest.tokenizer.to_dict(), "world_size": self.world, "ep_size": self.cfg.ep_size,
        }
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client)
        ckpt.save_rank_state(self.checkpoint_dir / tag, self.rank)
        if self.step == self.kill_during_save_at and self.is_rank0:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the tests: die before COMPLETE
        dist.barrier()  # every rank has finished writing
        if self.is_rank0:
            ckpt.save_inference_files(self.checkpoint_dir / tag, self.model_config, self.shards.manifest.tokenizer,
                                      self.shards.directory)
            ckpt.mark_complete(self.checkpoint_dir / tag, {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "ep_size": self.cfg.ep_size, "expert_ranges": self.expert_ranges, "zero_stage": self.stage,
                "bf16": self.ds_config["bf16"]["enabled"], "val_loss": self.last_val_loss,
                "model": self.model_config.name})
            ckpt.prune(self.checkpoint_dir, self.cfg.keep_last)
        dist.barrier()
        return self.checkpoint_dir / tag

    def checkpoint_to_resume(self) -> Path | None:
        """The complete checkpoint `--resume` points at (None: start fresh), checked against this run's
        layout and precision before any engine is built."""
        cfg = self.cfg
        if cfg.resume == "none":
            return None
        tag_dir = ckpt.newest_complete(self.checkpoint_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if tag_dir is None:
            return None
        info = ckpt.read_complete_info(tag_dir)
        if info["world_size"] != self.world or info["ep_size"] != cfg.ep_size:
            raise GptMoeError(
                f"{tag_dir}: saved with {info['world_size']} rank(s) and --ep-size {info['ep_size']}, resuming with "
                f"{self.world} and {cfg.ep_size}: optimizer shards cannot be re-split; resume with the same layout "
                "or start a new run (--resume none --run-dir ...)")
        bf16 = self.ds_config["bf16"]["enabled"]
        saved_bf16 = info.get("bf16", bf16)
        if saved_bf16 != bf16 or info["zero_stage"] != self.stage:
            raise GptMoeError(
                f"{tag_dir}: saved with ZeRO stage {info['zero_stage']} and bf16 {saved_bf16}, resuming with stage "
                f"{self.stage} and bf16 {bf16}: DeepSpeed's optimizer files differ; resume with the same DeepSpeed "
                "config (bf16 \"auto\" follows the hardware: set it explicitly) or start a new run (--resume none)")
        return tag_dir

    def resume(self, tag_dir: Path) -> None:
        _, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        self.step, self.tokens_seen = client["step"], client["tokens_seen"]
        self.bad_steps_total = client.get("bad_steps_total", 0)
        self.loader.load_state_dict(client["data"])
        ckpt.load_rank_state(tag_dir, self.rank)
        if self.is_rank0:
            log.warning("resumed from %s at step %d (%d tokens seen)", tag_dir, self.step, self.tokens_seen)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        """Runs grad_accum micro-batches and one optimizer step; returns this rank's mean losses."""
        sums = torch.zeros(4, device=self.device)  # loss, lm, mtp, aux; read once per step (one host sync)
        for _ in range(self.cfg.grad_accum):
            inputs, labels = self.loader.next_batch()
            out = self.engine(inputs.to(self.device), labels=labels.to(self.device))
            loss = out.loss
            if self.step + 1 in self.inject_nan_at:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            parts = [loss, out.lm_loss, out.mtp_loss, out.aux_loss]
            sums += torch.stack([p.detach().float() if p is not None else sums.new_zeros(()) for p in parts])
        return dict(zip(("loss", "lm_loss", "mtp_loss", "aux_loss"), (sums / self.cfg.grad_accum).tolist()))

    def update_balancing(self, applied: bool) -> torch.Tensor | None:
        """Sums every MoE layer's token counts over all ranks and moves the biases once. Returns the
        global loads [layers, experts] (for logging) or None without MoE layers."""
        if not self.moe_layers:
            return None
        loads = self._all_reduce(torch.stack([m.load_since_update for m in self.moe_layers]))
        for moe, load in zip(self.moe_layers, loads):
            if applied:
                update_bias(moe.gate, load, self.model_config.bias_update_rate)
            moe.load_since_update.zero_()
        return loads.cpu()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total = torch.zeros(2)
        for inputs, labels in self.val_batches:
            out = self.engine(inputs.to(self.device), labels=labels.to(self.device))
            total += torch.tensor([out.lm_loss.item(), 1.0])
        self.engine.train()
        total = self._all_reduce(total).cpu()
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    @torch.no_grad()
    def sample_text(self) -> str:
        """Greedy continuation of a fixed prompt (all ranks run it: experts and ZeRO-3 shards are shared)."""
        from gpt_moe.generate import greedy_uncached

        tokenizer = self.shards.tokenizer()
        prompt = tokenizer.encode_ordinary("def ")
        self.engine.eval()
        ids = greedy_uncached(self.engine.module, torch.tensor([prompt], device=self.device), self.cfg.sample_tokens,
                              vocab_limit=tokenizer.n_vocab)
        self.engine.train()
        return tokenizer.decode(ids[0].tolist())

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        if cfg.dry_run:
            print(self.banner())
            return {"dry_run": True}
        if self.resume_from is not None:
            self.resume(self.resume_from)
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "ds_config.resolved.json").write_text(json.dumps(self.ds_config, indent=2))
            (self.run_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            (self.run_dir / "model_config.json").write_text(json.dumps(self.model_config.to_dict(), indent=2))
            print(self.banner(), flush=True)

        tokens_per_step = cfg.seq_len * cfg.micro_batch * cfg.grad_accum * self.world
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        peak = self._all_reduce(torch.tensor([device_peak_flops(self.device, dtype)[0]], dtype=torch.float64)).item()
        throughput = Throughput(account(self.model_config, cfg.seq_len).flops_per_token, peak)
        last_step = cfg.max_steps
        if cfg.max_tokens:
            last_step = min(last_step, math.ceil(cfg.max_tokens / tokens_per_step))
        bar = tqdm(total=last_step, initial=self.step, disable=not self.is_rank0, unit="step", dynamic_ncols=True)
        history: list[dict[str, float]] = []
        last_val = float("nan")
        window = torch.zeros(4)
        window_steps = 0
        while self.step < last_step:
            step_start = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            losses = self.train_step()
            applied = self.engine.skipped_steps == skipped_before
            loads = self.update_balancing(applied)
            self.step += 1
            self.tokens_seen += tokens_per_step
            throughput.add(tokens_per_step)
            if applied:
                self.bad_steps_in_a_row = 0
                window += torch.tensor([losses["loss"], losses["lm_loss"], losses["mtp_loss"], losses["aux_loss"]])
                window_steps += 1
            else:
                self.bad_steps_total += 1
                self.bad_steps_in_a_row += 1
                self.writer.add_scalar("train/skipped_steps", self.bad_steps_total, self.step)
                if self.is_rank0:
                    bar.write(f"step {self.step}: non-finite loss or gradients, step skipped on all ranks "
                              f"({self.bad_steps_in_a_row} in a row)")
                if self.bad_steps_in_a_row >= cfg.max_bad_steps:
                    # skipped steps did not touch the weights: this saves the last good state
                    path = self.save()
                    self._write_summary(history, last_val)
                    raise GptMoeError(f"{self.bad_steps_in_a_row} non-finite steps in a row (max_bad_steps); "
                                      f"stopped, last good state saved to {path}; lower --lr or check the data")
            step_time = time.perf_counter() - step_start

            if self.step % cfg.log_interval == 0 or self.step == last_step:
                mean = self._all_reduce(window / max(window_steps, 1)).cpu() / self.world
                window.zero_()
                window_steps = 0
                perf = throughput.read_and_reset()
                scalars = {"train/loss": mean[0].item(), "train/lm_loss": mean[1].item(),
                           "train/mtp_loss": mean[2].item(), "train/aux_loss": mean[3].item(),
                           "train/lr": self.engine.get_lr()[0], "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                           "perf/tokens_per_sec": perf["tokens_per_sec"], "perf/mfu": perf["mfu"],
                           "perf/step_time": step_time, "perf/memory_gb": _memory_gb(self.device),
                           "train/tokens_seen": self.tokens_seen}
                if loads is not None:
                    self._log_experts(loads)
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, self.step)
                history.append({"step": self.step, **scalars})
                bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", tok_s=f"{perf['tokens_per_sec']:.0f}",
                                mfu=f"{perf['mfu']:.1%}", refresh=False)
                if self.is_rank0:
                    with open(self.run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": self.step, **scalars}) + "\n")
            if self.step % cfg.eval_interval == 0 or self.step == last_step:
                last_val = self.last_val_loss = self.evaluate()
                self.writer.add_scalar("val/loss", last_val, self.step)
                self.writer.add_scalar("val/ppl", math.exp(min(last_val, 50)), self.step)
                if cfg.sample_tokens:
                    self.writer.add_text("sample", self.sample_text(), self.step)
                if self.is_rank0:
                    bar.write(f"step {self.step}: val loss {last_val:.4f} (ppl {math.exp(min(last_val, 50)):.1f})")
                throughput.restart()  # keep evaluation out of the throughput window
            if self.step % cfg.save_interval == 0 or self.step == last_step:
                self.save()
                throughput.restart()
            bar.update(1)
        bar.close()
        return self._write_summary(history, last_val)

    def _write_summary(self, history: list[dict[str, float]], val_loss: float) -> dict[str, Any]:
        """runs/<run>/summary.json: per-logged-step scalars, final validation loss, layout."""
        self.writer.flush()
        result = {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": val_loss,
                  "skipped_steps": self.bad_steps_total, "layout": {"world_size": self.world,
                                                                    "ep_size": self.cfg.ep_size,
                                                                    "expert_ranges": self.expert_ranges},
                  "history": history}
        if self.is_rank0:
            ckpt.atomic_write_text(self.run_dir / "summary.json", json.dumps(result, indent=1))
        return result

    def close(self) -> None:
        """Flush the logs and take the process group down on every rank together. Leaving it to
        interpreter exit can abort a rank ("terminate called without an active exception") while
        communication threads are still alive."""
        self.writer.close()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _log_experts(self, loads: torch.Tensor) -> None:
        for i, moe, load in zip(self.moe_names, self.moe_layers, loads):
            stats = expert_load_stats(load)
            bias = moe.gate.e_score_correction_bias
            self.writer.add_scalar(f"experts/layer{i}_max_over_mean", stats["max_over_mean"], self.step)
            self.writer.add_scalar(f"experts/layer{i}_cv", stats["cv"], self.step)
            self.writer.add_scalar(f"experts/layer{i}_bias_range", (bias.max() - bias.min()).item(), self.step)
            self.writer.add_histogram(f"experts/layer{i}_load", load, self.step)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 ** 3
    import psutil

    return psutil.Process().memory_info().rss / 1024 ** 3
