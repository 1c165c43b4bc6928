"""How fine-tuning moved the routers: two models (a base and its fine-tuned child) routing the same tokens.

    loads = expert_loads(model, token_batches(shards, seq_len=512, batches=8))    # [layers, experts] per model
    drift = routing_drift(base, tuned, base_loads, tuned_loads)                   # list[LayerDrift]
    drift_chart(base_loads, tuned_loads, layers).save("drift.png")
    drift_report(base, tuned, shards, batches, chart_path)                        # all of it, as launch/eval.py shows

Per MoE layer: the Jensen-Shannon divergence (base 2: 0 = the same expert-load distribution, 1 = disjoint experts)
between the two models' expert loads on the same tokens; the experts that became dead (tokens in the base, none in
the tuned model) or hot (more than HOT times the uniform share in the tuned model, not in the base); and how far the
balancing biases moved (mean and largest |tuned - base|).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.data.chat_batches import PackedRows
from gpt_moe.data.shards import TokenShards, ValBatches
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.chat import RoutingRecord, recording_routing
from gpt_moe.serve.routing_view import BACKGROUND, TEXT, font, load_chart

HOT = 2.0  # an expert is hot when its share of the layer's assignments is above HOT x uniform


def token_batches(shards: TokenShards, seq_len: int, batches: int, micro_batch: int = 8,
                  ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(model inputs, counted positions [batch, seq] bool) of the validation split: windows of text, or for chat
    data packed conversations (their padding not counted), the first `batches` batches."""
    if shards.content != "chat":
        for inputs, labels in ValBatches(shards, seq_len, micro_batch, batches):
            yield {"input_ids": inputs, "labels": labels}, torch.ones(inputs.shape, dtype=torch.bool)
        return
    packed = PackedRows(shards, "val", seq_len, leave_out_longer=True)
    for start in range(0, min(len(packed), batches * micro_batch), micro_batch):
        rows = np.arange(start, min(start + micro_batch, len(packed)))
        real = torch.tensor([sum(int(packed.conversations.positions[c]) for c in packed.rows[i]) for i in rows])
        yield packed.batch(rows).model_inputs(), torch.arange(seq_len)[None, :] < real[:, None]


@torch.no_grad()
def expert_loads(model: DeepSeekForCausalLM, batches) -> torch.Tensor:
    """[moe layers, routed experts] int64: (token, slot) assignments of the counted positions, per main MoE layer."""
    layers = model.moe_layers(include_mtp=False)
    loads = torch.zeros(len(layers), model.config.n_routed_experts, dtype=torch.int64)
    for inputs, counted in batches:
        with recording_routing(layers):
            model(**inputs)
            for j, (_, moe) in enumerate(layers):
                chosen = moe.last_expert_ids[counted]  # [counted positions, k]
                loads[j] += torch.bincount(chosen.flatten().cpu(), minlength=loads.shape[1])
    return loads


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits of two count vectors (normalised here): 0 same, 1 disjoint."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> float:
        kept = a > 0
        return float((a[kept] * torch.log2(a[kept] / m[kept])).sum())

    return (kl(p) + kl(q)) / 2


@dataclass(frozen=True)
class LayerDrift:
    layer: int
    js: float  # bits
    became_dead: list[int]
    became_hot: list[int]
    bias_mean_move: float  # mean |tuned - base| of the balancing biases
    bias_max_move: float


def routing_drift(base: DeepSeekForCausalLM, tuned: DeepSeekForCausalLM, base_loads: torch.Tensor,
                  tuned_loads: torch.Tensor) -> list[LayerDrift]:
    """Per main MoE layer, from the two models' loads on the same tokens and their biases."""
    drifts = []
    for j, ((layer, base_moe), (_, tuned_moe)) in enumerate(zip(base.moe_layers(False), tuned.moe_layers(False))):
        p, q = base_loads[j], tuned_loads[j]
        hot_p, hot_q = p > HOT * p.sum() / len(p), q > HOT * q.sum() / len(q)
        move = (tuned_moe.gate.e_score_correction_bias.float() - base_moe.gate.e_score_correction_bias.float()).abs()
        drifts.append(LayerDrift(layer, js_divergence(p, q), torch.nonzero((p > 0) & (q == 0)).flatten().tolist(),
                                 torch.nonzero(hot_q & ~hot_p).flatten().tolist(), move.mean().item(),
                                 move.max().item()))
    return drifts


def _record(loads: torch.Tensor, layers: list[int], k: int) -> RoutingRecord:
    """A RoutingRecord whose load per layer is `loads` [layers, experts] (one pseudo-token per assignment slot
    group), so the app's `load_chart` draws it."""
    record = RoutingRecord(layers, loads.shape[1], 1)
    per_layer = [torch.repeat_interleave(torch.arange(loads.shape[1]), loads[j]).tolist() for j in range(len(layers))]
    for t in range(max((len(ids) for ids in per_layer), default=0)):
        record.append(0, {layer: [ids[t]] if t < len(ids) else [] for layer, ids in zip(layers, per_layer)})
    return record


def drift_chart(base_loads: torch.Tensor, tuned_loads: torch.Tensor, layers: list[int], titles=("base", "tuned"),
                ) -> Image.Image:
    """The two models' expert loads (the app's load chart, stacked by layer), one above the other."""
    charts = []
    for title, loads in zip(titles, (base_loads, tuned_loads)):
        chart = load_chart(_record(loads, layers, 1))
        ImageDraw.Draw(chart).rectangle((0, 0, chart.width, 26), fill=BACKGROUND)
        ImageDraw.Draw(chart).text((12, 8), f"{title}: expert load on the same tokens", fill=TEXT, font=font(13))
        charts.append(chart)
    image = Image.new("RGB", (max(c.width for c in charts), sum(c.height for c in charts)), BACKGROUND)
    y = 0
    for chart in charts:
        image.paste(chart, (0, y))
        y += chart.height
    return image


def drift_report(base: LoadedModel, tuned: LoadedModel, shards: TokenShards, batches: int, chart: Path) -> dict:
    """Both models route the first `batches` validation batches of `shards` (rows of up to 512 tokens); the per-layer
    drift as plain data, and the chart saved to `chart`."""
    seq_len = min(512, base.model.config.max_position_embeddings)
    loads = [expert_loads(m.model, token_batches(shards, seq_len, batches)) for m in (base, tuned)]
    drifts = routing_drift(base.model, tuned.model, *loads)
    chart.parent.mkdir(parents=True, exist_ok=True)
    drift_chart(*loads, [d.layer for d in drifts], titles=(f"base {base.source}", f"tuned {tuned.source}")).save(chart)
    tokens = int(loads[0][0].sum()) // base.model.config.num_experts_per_tok
    return {"content": shards.content, "tokens": tokens, "chart": str(chart),
            "layers": [dataclasses.asdict(d) for d in drifts]}
