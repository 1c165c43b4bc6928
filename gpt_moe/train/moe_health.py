"""MoE health per layer and log window, and the warning when a layer's routing collapses.

Beside the load spread (`gpt_moe.train.metrics.expert_load_stats`), each window of each MoE layer gives:

* `dead`: routed experts that received no token in the window (over all ranks);
* `min_over_mean`: the least-loaded expert's tokens over the mean (0 when any expert is dead);
* `entropy`: the mean over the window's tokens of the entropy of the normalised router scores,
  over log E (`gpt_moe.model.moe.router_entropy`: 1 = the router cannot tell experts apart, 0 = one
  expert takes all the score);
* `ep_skew` (expert parallelism only): the token rows the busiest rank's experts processed over the
  mean over ranks (1 = every rank's experts did the same work);
* `bias_drift`: the mean over experts of |bias now - bias at the previous log| (how far aux-loss-free
  balancing moved the selection biases in the window).

A layer where more than half the routed experts are dead for `windows` logs in a row has collapsed:
`CollapseWatch` says so once per episode (again only after the layer recovers and collapses anew).
"""

from __future__ import annotations

import torch


def layer_health(load: torch.Tensor, routing: torch.Tensor, bias: torch.Tensor, previous_bias: torch.Tensor,
                 rows_per_rank: torch.Tensor | None = None) -> dict[str, float]:
    """One layer's window. load: [experts] tokens per routed expert summed over ranks and steps; routing: [2]
    (sum over tokens of the normalised router entropy, tokens); bias, previous_bias: [experts];
    rows_per_rank: [ranks] rows processed by each rank's experts (None without expert parallelism)."""
    load = load.double()
    mean = load.mean().item()
    stats = {"dead": float((load == 0).sum().item()),
             "min_over_mean": load.min().item() / mean if mean > 0 else 0.0,
             "entropy": (routing[0] / routing[1]).item() if routing[1] > 0 else float("nan"),
             "bias_drift": (bias.double() - previous_bias.double()).abs().mean().item()}
    if rows_per_rank is not None:
        rows = rows_per_rank.double()
        stats["ep_skew"] = rows.max().item() / rows.mean().item() if rows.mean() > 0 else float("nan")
    return stats


class CollapseWatch:
    """Counts, per layer, the log windows in a row in which more than half of its routed experts were dead."""

    def __init__(self, windows: int) -> None:
        self.windows = windows
        self.streak: dict[int, int] = {}

    def update(self, layer: int, dead: int, experts: int, step: int) -> str | None:
        """The warning, the first time the layer's streak reaches `windows`; else None."""
        collapsed = 2 * dead > experts
        self.streak[layer] = self.streak.get(layer, 0) + 1 if collapsed else 0
        if self.streak[layer] != self.windows:
            return None
        return (f"step {step}: MoE layer {layer} has collapsed: {dead} of its {experts} routed experts received no "
                f"token in each of the last {self.windows} log windows; lower the learning rate, raise "
                "--bias-update-rate or add --router-z-loss-coef / --seq-aux-loss-coef")
