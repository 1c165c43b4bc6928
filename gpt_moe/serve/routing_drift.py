"""How fine-tuning moved the routers: two models (a base and its fine-tuned child) routing the same tokens, as
`launch/eval.py --routing` shows it.

    loads = expert_loads(model, token_batches(shards, seq_len=512, batches=8))    # [layers, experts] per model
    drift = routing_drift(base, tuned, base_loads, tuned_loads)                   # list[LayerDrift]
    drift_chart(base_loads, tuned_loads, layers).save("drift.png")
    drift_report(base, tuned, shards, batches, chart_path)                        # all of it, as launch/eval.py shows

The figures per MoE layer (Jensen-Shannon divergence of the expert loads, experts that became dead or hot, how far
the balancing biases moved) are `gpt_moe.model.routing_drift`'s, which a fine-tuning run also reports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.data.chat_batches import PackedRows
from gpt_moe.data.shards import TokenShards, ValBatches
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import recorded_loads, recording_routing
from gpt_moe.model.routing_drift import LayerDrift, layer_drifts
from gpt_moe.serve.chat import RoutingRecord
from gpt_moe.serve.routing_view import BACKGROUND, TEXT, font, load_chart


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
            loads += recorded_loads(layers, counted)
    return loads


def routing_drift(base: DeepSeekForCausalLM, tuned: DeepSeekForCausalLM, base_loads: torch.Tensor,
                  tuned_loads: torch.Tensor) -> list[LayerDrift]:
    """Per main MoE layer, from the two models' loads on the same tokens and their biases."""
    def biases(model: DeepSeekForCausalLM) -> torch.Tensor:
        return torch.stack([moe.gate.e_score_correction_bias.float().cpu() for _, moe in model.moe_layers(False)])

    layers = [layer for layer, _ in base.moe_layers(False)]
    return layer_drifts(layers, base_loads, tuned_loads, biases(base), biases(tuned))


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
            "layers": [d.to_dict() for d in drifts]}
