"""One evaluation of a model as a record: its figures by name, the routing drift from its parent, the parent's own
figures; and the table they are shown in. Torch-free, as the checkpoint records that hold it.

    evaluation = Evaluation({"val_loss": 3.94, "val_bpb": 1.67, "humaneval_bpb": 2.06, "humaneval_problems": 32},
                            step=300)
    Evaluation.from_dict(evaluation.to_dict(), where) == evaluation
    print(figure_table([("runs/tiny", a), ("runs/tiny-sft", b)]))         # side by side, with the difference
    figure_table([("base", evaluation.parent), ("fine-tuned", evaluation)], markdown=True)   # the model card's

A training run evaluates at every `--eval-interval` (`gpt_moe.train.evaluator`), logs each figure as `eval/<name>`
in TensorBoard and keeps the last evaluation in each checkpoint's COMPLETE record (`gpt_moe.checkpoint.records`);
an export copies it into its training facts and its model card; `launch/eval.py` computes the same figures for any
checkpoint (`gpt_moe.serve.eval_suite`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpt_moe.errors import CheckpointError, first_line
from gpt_moe.model.routing_drift import LayerDrift


@dataclass(frozen=True)
class Figure:
    label: str
    format: str  # a format spec: ".4f", ".1%", "d"


FIGURES: dict[str, Figure] = {
    "val_loss": Figure("validation loss, nats/token", ".4f"),
    "val_bpb": Figure("validation bits per byte (text tokens)", ".4f"),
    "chat_end_prob": Figure("end-of-turn probability where the reference ends (teacher-forced)", ".1%"),
    "mtp_acceptance": Figure("MTP draft acceptance (teacher-forced)", ".1%"),
    "humaneval_bpb": Figure("HumanEval canonical solutions, bits per byte", ".4f"),
    "humaneval_problems": Figure("HumanEval problems scored (the first by task id)", "d"),
    "held_out_assistant_loss": Figure("held-out chat: assistant-token loss, nats/token", ".4f"),
    "held_out_assistant_bpb": Figure("held-out chat: assistant-token bits per byte", ".4f"),
    "chat_replies_ended": Figure("held-out chat: greedy replies that end their turn", ".1%"),
    "chat_exact_in_context": Figure("held-out chat: exact answers to in-context questions", ".1%"),
}
"""Every figure an evaluation may hold, by name, in the order tables show them. The validation figures are on the
run's own validation split (for chat data its trained, assistant tokens), so they compare between checkpoints of one
run or of runs on the same data; bits per byte and HumanEval compare across tokenizers."""
DRIFT_LABEL = "routing drift from the parent, JS bits: layer {layer}"


@dataclass(frozen=True)
class Evaluation:
    """figures: name (FIGURES) -> value; step: the optimizer step evaluated (0: before fine-tuning, the parent's
    weights); drift: per main MoE layer, how far routing moved from the `--init-from` parent on the validation
    tokens (`gpt_moe.model.routing_drift`); parent: the parent's figures on the same data, before step 1."""

    figures: dict[str, float] = field(default_factory=dict)
    step: int | None = None
    drift: tuple[LayerDrift, ...] = ()
    parent: Evaluation | None = None

    def get(self, name: str) -> float | None:
        value = self.figures.get(name)
        return value if value is not None and math.isfinite(value) else None

    def scalars(self) -> dict[str, float]:
        """The figures and the drift as TensorBoard scalars: eval/<name>, eval/routing_js_layer<L> and their mean."""
        scalars = {f"eval/{name}": value for name, value in self.figures.items()}
        if self.drift:
            scalars.update({f"eval/routing_js_layer{d.layer}": d.js for d in self.drift})
            scalars["eval/routing_js_mean"] = sum(d.js for d in self.drift) / len(self.drift)
        return scalars

    def rows(self) -> dict[str, float]:
        """What a table shows, label -> value: the figures (FIGURES' order and labels first), the drift per layer."""
        names = [n for n in FIGURES if n in self.figures] + sorted(set(self.figures) - set(FIGURES))
        rows = {FIGURES[n].label if n in FIGURES else n: self.figures[n] for n in names}
        rows.update({DRIFT_LABEL.format(layer=d.layer): d.js for d in self.drift})
        return rows

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.step, "figures": dict(self.figures)}
        if self.drift:
            data["drift"] = [d.to_dict() for d in self.drift]
        if self.parent is not None:
            data["parent"] = self.parent.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Evaluation:
        """From `to_dict`'s object; CheckpointError naming `where` when it is malformed."""
        try:
            figures = {str(name): float(value) for name, value in data.get("figures", {}).items()}
            drift = tuple(LayerDrift.from_dict(d) for d in data.get("drift", ()))
            parent = cls.from_dict(data["parent"], where) if data.get("parent") is not None else None
            step = None if data.get("step") is None else int(data["step"])
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: malformed evaluation record ({first_line(err)}); expected "
                                  '{"step": N, "figures": {name: number}, "drift": [...], "parent": {...}}') from None
        return cls(figures, step, drift, parent)


def _cell(value: float | None, spec: str, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if spec == "d":
        return f"{value:+.0f}" if signed else f"{value:.0f}"
    return f"{value:{'+' if signed else ''}{spec}}"


def figure_table(columns: Sequence[tuple[str, Evaluation | None]], markdown: bool = False) -> str:
    """The figures of each evaluation side by side (a row per figure any of them has; "-" where one lacks it), and
    with two columns their difference (second - first). Plain text aligned in columns, or a markdown table."""
    specs = {FIGURES[n].label: FIGURES[n].format for n in FIGURES}
    rows: dict[str, list[float | None]] = {}
    for i, (_, evaluation) in enumerate(columns):
        for label, value in (evaluation.rows() if evaluation is not None else {}).items():
            rows.setdefault(label, [None] * len(columns))[i] = value
    header = ["figure", *(title for title, _ in columns)] + (["difference"] if len(columns) == 2 else [])
    body = []
    for label, values in rows.items():
        spec = specs.get(label, ".4f")
        cells = [_cell(v, spec) for v in values]
        if len(columns) == 2:
            both = None if None in values else values[1] - values[0]
            cells.append(_cell(both, spec, signed=True))
        body.append([label, *cells])
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in [header, *body])
