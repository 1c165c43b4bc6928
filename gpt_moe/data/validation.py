"""Teacher-forced figures over validation batches, in one pass: the loss (nats per counted token), its bits per byte,
a chat run's end-of-turn probability and the routed experts' loads; and the MTP block's draft acceptance.

    totals = validation_totals(model, batches, device, byte_lengths, end_ids, moe_layers)   # ValidationTotals
    totals = totals.map(all_reduce)                # summed over ranks (inside training)
    totals.figures()                               # {"val_loss", "val_bpb", "chat_end_prob"}
    acceptance(mtp_counts(model, batches, device)) # MTP draft acceptance, or None

The training run's evaluator (`gpt_moe.train.evaluator`) and `launch/eval.py` (`gpt_moe.serve.eval_suite`) both
compute their figures here, so a checkpoint evaluated afterwards gives the figures its run logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from gpt_moe.data.bits_per_byte import bits_per_byte, nats_and_bytes
from gpt_moe.data.chat_batches import PackedBatch
from gpt_moe.model.loss import IGNORE_INDEX
from gpt_moe.model.moe import MoE, recorded_loads, recording_routing
from gpt_moe.model.mtp_acceptance import mtp_agreement

Batch = tuple[torch.Tensor, torch.Tensor] | PackedBatch
"""A validation batch: (inputs, labels) windows of text [batch, seq] each, or packed conversations."""


def model_inputs(batch: Batch, device: torch.device) -> dict:
    """The model's keyword arguments for a batch: (inputs, labels) windows of text, or packed conversations."""
    if isinstance(batch, PackedBatch):
        return batch.to(device).model_inputs()
    inputs, labels = batch
    return {"input_ids": inputs.to(device), "labels": labels.to(device)}


@dataclass(frozen=True)
class ValidationTotals:
    """Sums over the batches (and, mapped through an all-reduce, over ranks)."""

    sums: torch.Tensor  # float64 [6]: nats, counted tokens; text nats, text bytes; end-of-turn probability, targets
    loads: torch.Tensor  # int64 [main MoE layers, routed experts]: (token, slot) assignments of the counted tokens

    def map(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> ValidationTotals:
        return ValidationTotals(reduce(self.sums).cpu(), reduce(self.loads).cpu() if self.loads.numel() else self.loads)

    @property
    def bits_per_byte(self) -> float:
        """Of the text tokens counted (NaN when none)."""
        return bits_per_byte(self.sums[2:4])

    def figures(self) -> dict[str, float]:
        """val_loss (the mean over every counted token: every target of text, every trained token of chat data;
        NaN when none), val_bpb (of the text tokens among them), and where end-of-turn tokens were counted
        chat_end_prob (the mean probability the model gives to ending the turn where the reference ends it)."""
        s = self.sums
        figures = {"val_loss": (s[0] / s[1]).item() if s[1] > 0 else float("nan"), "val_bpb": self.bits_per_byte}
        if s[5] > 0:
            figures["chat_end_prob"] = (s[4] / s[5]).item()
        return figures


@torch.no_grad()
def validation_totals(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
                      byte_lengths: torch.Tensor, end_ids: Sequence[int] = (),
                      moe_layers: Sequence[tuple[int, MoE]] = ()) -> ValidationTotals:
    """One forward per batch (`model` is anything called as the model, a DeepSpeed engine too). byte_lengths:
    [vocab] (`gpt_moe.data.bits_per_byte.token_byte_lengths`); end_ids: the end-of-turn tokens whose probability
    is summed (none for text); moe_layers: the main MoE layers whose loads are counted (none: no loads)."""
    sums = torch.zeros(6, dtype=torch.float64)
    n_experts = moe_layers[0][1].config.n_routed_experts if moe_layers else 0
    loads = torch.zeros(len(moe_layers), n_experts, dtype=torch.int64)
    ends = torch.tensor(sorted(end_ids), dtype=torch.int64, device=device)
    for batch in batches:
        inputs = model_inputs(batch, device)
        with recording_routing(moe_layers):
            nats = model(**inputs, per_token_nats=True).token_nats  # [batch, seq]
            counted = inputs["labels"] != IGNORE_INDEX
            if moe_layers:
                loads += recorded_loads(moe_layers, counted)
        at_end = torch.isin(inputs["labels"], ends)
        sums += torch.cat([torch.stack([nats.double().sum(), counted.sum().double()]).cpu(),
                           nats_and_bytes(nats, inputs["labels"], byte_lengths),
                           torch.stack([torch.exp(-nats.double())[at_end].sum(), at_end.sum().double()]).cpu()])
    return ValidationTotals(sums, loads)


@torch.no_grad()
def mtp_counts(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device) -> torch.Tensor:
    """float64 [2]: (positions where the MTP block's top token for the token after next is the main model's,
    positions counted) over the batches (`gpt_moe.model.mtp_acceptance`). model: the `DeepSeekForCausalLM`."""
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        counts += mtp_agreement(model, **model_inputs(batch, device)).cpu().double()
    return counts


def acceptance(counts: torch.Tensor) -> float | None:
    """The share (counts [2]: agreed, counted), None when nothing was counted."""
    return (counts[0] / counts[1]).item() if counts[1] > 0 else None
