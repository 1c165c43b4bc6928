"""How far fine-tuning moved the routers, from two models' expert loads on the same tokens and their balancing biases.

    drifts = layer_drifts(layers, base_loads, tuned_loads, base_biases, tuned_biases)    # list[LayerDrift]

Per main MoE layer: the Jensen-Shannon divergence (base 2: 0 = the same expert-load distribution, 1 = disjoint
experts) between the two models' loads; the experts that became dead (tokens in the base, none in the tuned model)
or hot (more than HOT times the uniform share in the tuned model, not in the base); and how far the balancing biases
moved (mean and largest |tuned - base|). Torch-free (numpy), so the checkpoint records that keep a drift stay light:
the training run computes it at each evaluation of an `--init-from` run (`gpt_moe.train.evaluator`),
`launch/eval.py --routing` for any two models (`gpt_moe.serve.routing_drift`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HOT = 2.0  # an expert is hot when its share of the layer's assignments is above HOT x uniform


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits of two count vectors (normalised here): 0 same, 1 disjoint."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        kept = a > 0
        return float((a[kept] * np.log2(a[kept] / m[kept])).sum())

    return (kl(p) + kl(q)) / 2


@dataclass(frozen=True)
class LayerDrift:
    layer: int
    js: float  # bits
    became_dead: list[int]
    became_hot: list[int]
    bias_mean_move: float  # mean |tuned - base| of the balancing biases
    bias_max_move: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerDrift:
        return cls(int(data["layer"]), float(data["js"]), [int(e) for e in data["became_dead"]],
                   [int(e) for e in data["became_hot"]], float(data["bias_mean_move"]), float(data["bias_max_move"]))


def layer_drifts(layers: Sequence[int], base_loads, tuned_loads, base_biases, tuned_biases) -> list[LayerDrift]:
    """layers: the main MoE layers' indices; *_loads: [layers, routed experts] (token, slot) assignments of the same
    tokens; *_biases: [layers, routed experts] the balancing biases (anything numpy reads: tensors, lists)."""
    base_loads, tuned_loads = np.asarray(base_loads, dtype=np.int64), np.asarray(tuned_loads, dtype=np.int64)
    moves = np.abs(np.asarray(tuned_biases, dtype=np.float64) - np.asarray(base_biases, dtype=np.float64))
    drifts = []
    for layer, p, q, move in zip(layers, base_loads, tuned_loads, moves):
        hot_p, hot_q = p > HOT * p.sum() / len(p), q > HOT * q.sum() / len(q)
        drifts.append(LayerDrift(int(layer), js_divergence(p, q), np.flatnonzero((p > 0) & (q == 0)).tolist(),
                                 np.flatnonzero(hot_q & ~hot_p).tolist(), float(move.mean()), float(move.max())))
    return drifts
