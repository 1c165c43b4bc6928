"""What a practitioner watches during a run, in one place: the progress bar, TensorBoard, `metrics.jsonl` and the
closing `summary.json`.

Per log window (`--log-interval` steps): the mean losses over ranks, learning rate, gradient norm, tokens/s and MFU
(`gpt_moe.train.metrics`), memory, and per MoE layer the load spread and health (`gpt_moe.train.moe_health`) with
the collapse warning. Per evaluation: its figures (`gpt_moe.checkpoint.evaluation`: validation loss, perplexity and
bits per byte, HumanEval bits per byte, the MTP draft acceptance, a fine-tuning run's routing drift ...) as `eval/*`
scalars, its seconds, and a text sample (TensorBoard; the scalars also as one `metrics.jsonl` line, told apart by
its `eval/` keys). The summary adds how much of the run's time went to evaluations.
Rank 0 writes; every rank joins the collectives (the monitor calls them on all ranks in the same order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
from typing import Any

import torch
import torch.distributed as dist

from gpt_moe.atomic import write_atomic
from gpt_moe.model.moe import MoE
from gpt_moe.model.params import account
from gpt_moe.train.engine import Distributed, InitReport
from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.train.hardware import device_peak_flops
from gpt_moe.train.metrics import Throughput, dashboard_layout, expert_load_stats, make_writer
from gpt_moe.train.moe_health import CollapseWatch, layer_health
from gpt_moe.train.peak_flops import cpu_affinity, usable_cores
from gpt_moe.train.plan import RunPlan

log = logging.getLogger(__name__)
LOSS_NAMES = ("loss", "lm_loss", "mtp_loss", "aux_loss", "z_loss")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


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


class TrainingMonitor:
    """The run's logs. `start` measures the peak FLOP/s (all ranks), the rest follows the loop."""

    def __init__(self, plan: RunPlan, context: Distributed, moe_layers: list[tuple[int, MoE]], chat: bool) -> None:
        self.plan, self.context, self.moe_layers, self.chat = plan, context, moe_layers, chat
        self.writer = make_writer(str(plan.run_dir / "tensorboard"), context.is_rank0)
        self.history: list[dict[str, Any]] = []
        self.window, self.window_loads = LossWindow(), None
        self.collapse = CollapseWatch(plan.train.collapse_windows)
        self.bias_at_log: list[torch.Tensor] = []
        self.throughput: Throughput | None = None
        self.evaluation_seconds = 0.0  # all evaluations of this process so far

    def start(self) -> None:
        """Before the first step: the dashboard layout, the balancing biases to measure drift from, the peak
        FLOP/s that MFU divides by, the clock."""
        self.bias_at_log = [moe.gate.e_score_correction_bias.detach().cpu().clone() for _, moe in self.moe_layers]
        self.writer.add_custom_scalars(dashboard_layout([layer for layer, _ in self.moe_layers]))
        peak, how = self._peak_flops()
        if self.context.is_rank0:
            log.warning("MFU divides by a peak of %.4g FLOP/s (%s)", peak, how)
        self.throughput = Throughput(account(self.plan.model, self.plan.train.seq_len).flops_per_token, peak, how,
                                     warn=self.context.is_rank0)

    def _peak_flops(self) -> tuple[float, str]:
        """(the run's total peak FLOP/s, how rank 0's share was obtained): per GPU the table (or --peak-flops),
        summed over ranks. On CPU the ranks of one host share its cores, so one of them (the first) measures
        for the host with the threads they use together (at most the cores they may run on) while the others
        wait; one measurement per host is reproducible and cached (`gpt_moe.train.peak_flops`), where ranks
        measuring at the same time would split the cores unevenly. Hosts' peaks are summed."""
        device, cfg = self.context.device, self.plan.train
        dtype = torch.bfloat16 if self.plan.bf16 else torch.float32
        host, threads, cores = socket.gethostname(), torch.get_num_threads(), usable_cores()
        ranks: list[tuple[str, int, set[int]]] = [("", 0, set())] * self.context.world
        dist.all_gather_object(ranks, (host, threads, cores))
        mine = [r for r in ranks if r[0] == host]
        first_of_host = next(i for i, r in enumerate(ranks) if r[0] == host)
        peak, how = 0.0, "another rank of this host measures for it"
        if device.type != "cpu" or first_of_host == self.context.rank:
            if cfg.peak_flops:
                peak, how = cfg.peak_flops, "--peak-flops"
            elif device.type != "cpu":
                peak, how = device_peak_flops(device, dtype)
            else:
                host_cores = set().union(*(r[2] for r in mine))
                with cpu_affinity(host_cores):
                    peak, how = device_peak_flops(device, dtype, min(len(host_cores), sum(r[1] for r in mine)))
        return self.context.all_reduce(torch.tensor([peak], dtype=torch.float64)).item(), how

    # ------------------------------------------------------------------ per step
    def step(self, tokens: int, losses: dict[str, float] | None, loads: torch.Tensor | None) -> None:
        """One optimizer step: its tokens, its losses (None when it was skipped as non-finite), the global expert
        loads it routed [layers, experts] (skipped steps routed tokens too)."""
        self.throughput.add(tokens)
        if losses is not None:
            self.window.add(losses)
        if loads is not None:
            self.window_loads = loads if self.window_loads is None else self.window_loads + loads

    def skipped(self, step: int, total: int, in_a_row: int, bar) -> None:
        self.writer.add_scalar("train/skipped_steps", total, step)
        if self.context.is_rank0:
            bar.write(f"step {step}: non-finite loss or gradients, step skipped on all ranks ({in_a_row} in a row)")

    def log(self, step: int, engine, step_time: float, counters: dict[str, int], bar) -> None:
        """Scalars of the window since the last log (mean over ranks) to TensorBoard, metrics.jsonl, the bar.
        counters: tokens_seen and (chat data) trained_tokens."""
        mean = self.context.all_reduce(self.window.mean()).cpu() / self.context.world
        self.window.reset()
        loads, self.window_loads = self.window_loads, None
        perf = self.throughput.read_and_reset()
        scalars = {f"train/{name}": value.item() for name, value in zip(LOSS_NAMES, mean)}
        scalars.update({"train/lr": engine.get_lr()[0],
                        "train/grad_norm": float(engine.get_global_grad_norm() or 0.0),
                        "perf/tokens_per_sec": perf["tokens_per_sec"], "perf/mfu": perf["mfu"],
                        "perf/step_time": step_time, "perf/memory_gb": current_memory_gib(self.context.device),
                        "train/tokens_seen": counters["tokens_seen"]})
        if self.chat:
            scalars["train/trained_tokens"] = counters["trained_tokens"]
        if loads is not None:
            scalars.update(self._expert_scalars(step, loads, bar))
        record: dict[str, Any] = {"step": step, **scalars}
        if loads is not None:  # the window's load vectors: metrics.jsonl and summary.json, not TensorBoard
            record["expert_loads"] = {str(layer): load.tolist() for (layer, _), load in zip(self.moe_layers, loads)}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.history.append(record)
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", tok_s=f"{perf['tokens_per_sec']:.0f}",
                        mfu="wrong peak" if perf["wrong_peak"] else f"{perf['mfu']:.1%}", refresh=False)
        if self.context.is_rank0:
            with open(self.plan.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _expert_scalars(self, step: int, loads: torch.Tensor, bar) -> dict[str, float]:
        """Per MoE layer: load spread and health (`gpt_moe.train.moe_health`) of the window, as scalars; the load
        histogram to TensorBoard; the collapse warning (bar, log, TensorBoard text) when a layer collapses.
        loads: [layers, experts] tokens per routed expert over the window (all ranks)."""
        routing, rows = self._read_routing_window()
        scalars: dict[str, float] = {}
        for i, ((layer, moe), load) in enumerate(zip(self.moe_layers, loads)):
            bias = moe.gate.e_score_correction_bias.detach().cpu()
            health = layer_health(load, routing[i], bias, self.bias_at_log[i], rows[:, i] if rows is not None else None)
            self.bias_at_log[i] = bias.clone()
            stats = {**expert_load_stats(load), "bias_range": (bias.max() - bias.min()).item(), **health}
            scalars.update({f"experts/layer{layer}_{name}": value for name, value in stats.items()})
            self.writer.add_histogram(f"experts/layer{layer}_load", load, step)
            warning = self.collapse.update(layer, int(health["dead"]), load.numel(), step)
            if warning and self.context.is_rank0:
                bar.write(f"warning: {warning}")
                self.writer.add_text("experts/collapse", warning, step)
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
        routing = self.context.all_reduce(local.double()).cpu()
        if self.plan.train.ep_size == 1:
            return routing, None
        gathered = [torch.zeros_like(rows) for _ in range(self.context.world)]
        dist.all_gather(gathered, rows)
        return routing, torch.stack(gathered).cpu()

    # ------------------------------------------------------------------ evaluations and the end
    def evaluation(self, step: int, evaluation: Evaluation, sample: str | None, seconds: float, bar) -> None:
        """An evaluation's scalars to TensorBoard and metrics.jsonl, its figures as a line on the bar (rank 0; printed
        when there is no bar yet: a fine-tuning run's parent, at step 0)."""
        self.evaluation_seconds += seconds
        scalars = evaluation.scalars()
        val_loss = evaluation.get("val_loss")
        if val_loss is not None:
            scalars["eval/val_ppl"] = math.exp(min(val_loss, 50))
        scalars["perf/eval_seconds"] = seconds
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if self.context.is_rank0:
            with open(self.plan.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            for line in evaluation_lines(step, evaluation, seconds):
                if bar is not None:
                    bar.write(line)
                else:
                    print(line, flush=True)
        if sample is not None:
            self.writer.add_text("sample", sample, step)
        if self.throughput is not None:
            self.throughput.restart()  # keep evaluation out of the throughput window

    def restart_clock(self) -> None:
        """Keep a checkpoint save out of the throughput window."""
        self.throughput.restart()

    def summary(self, counters: dict[str, Any], evaluation: Evaluation | None, expert_ranges: list[list[int] | None],
                init_report: InitReport | None, seconds: float) -> dict:
        """runs/<run>/summary.json: per-logged-step scalars, the last evaluation (its validation loss and bits per
        byte also as keys of their own), the layout, each rank's peak memory, the run's seconds and the share the
        evaluations took (`time`), and with --init-from what reading the weights cost each rank (`init_from`: bytes
        read, the memory of building and loading the model). counters: step, tokens_seen, skipped_steps."""
        self.writer.flush()
        peak = peak_memory_gib(self.context.device)
        if init_report is not None and init_report.process_peak_before_gib is not None:
            peak = max(peak, init_report.process_peak_before_gib)  # the load's memory window reset the peak mark
        peaks: list[Any] = [0.0] * self.context.world
        dist.all_gather_object(peaks, peak)
        val_loss = evaluation.get("val_loss") if evaluation is not None else None
        result = {**counters, "val_loss": float("nan") if val_loss is None else val_loss,
                  "val_bpb": evaluation.get("val_bpb") if evaluation is not None else None,
                  "evaluation": evaluation.to_dict() if evaluation is not None else None,
                  "time": {"run_s": seconds, "evaluation_s": self.evaluation_seconds,
                           "evaluation_share": self.evaluation_seconds / seconds if seconds > 0 else None},
                  "peak_memory_gib": peaks,
                  "layout": {**dataclasses.asdict(self.plan.layout), "expert_ranges": expert_ranges},
                  "history": self.history}
        if init_report is not None:
            reports: list[Any] = [None] * self.context.world
            dist.all_gather_object(reports, init_report.to_dict())
            result["init_from"] = reports
        if self.context.is_rank0:
            write_atomic(self.plan.run_dir / SUMMARY_FILE, json.dumps(result, indent=1))
        return result

    def close(self) -> None:
        self.writer.close()


def evaluation_lines(step: int, evaluation: Evaluation, seconds: float) -> list[str]:
    """What an evaluation prints: its figures in one line, the routing drift per layer in another."""
    f, parts = evaluation.get, []
    if f("val_loss") is not None:
        parts.append(f"val loss {f('val_loss'):.4f} (ppl {math.exp(min(f('val_loss'), 50)):.1f}, "
                     f"{f('val_bpb') or float('nan'):.4f} bits per byte)")
    if f("chat_end_prob") is not None:
        parts.append(f"end-of-turn probability {f('chat_end_prob'):.1%}")
    if f("humaneval_bpb") is not None:
        parts.append(f"HumanEval {f('humaneval_bpb'):.4f} bits per byte ({f('humaneval_problems'):.0f} problems)")
    if f("mtp_acceptance") is not None:
        parts.append(f"MTP draft acceptance {f('mtp_acceptance'):.1%}")
    what = f"step {step}" + (" (the parent, before fine-tuning)" if step == 0 else "")
    lines = [f"{what}: {'; '.join(parts)} [{seconds:.1f} s]"] if parts else []
    if evaluation.drift:
        lines.append(f"{what}: routing drift from the parent, JS bits per MoE layer: "
                     + ", ".join(f"{d.layer}: {d.js:.4f}" for d in evaluation.drift)
                     + "".join(f"; layer {d.layer} experts became dead {d.became_dead}" for d in evaluation.drift
                               if d.became_dead))
    return lines


def current_memory_gib(device: torch.device) -> float:
    """This rank's memory now: allocated on a GPU (its peak so far), resident on CPU."""
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
