"""Routing drift (`launch/eval.py --routing BASE TUNED`): identical models drift by nothing; a tuned copy whose biases
send one layer's tokens away from two experts and another layer's to one expert names exactly those experts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS
from PIL import Image

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import LoadedModel, load_for_inference
from gpt_moe.data.shards import TokenShards
from gpt_moe.model.routing_drift import js_divergence
from gpt_moe.serve.routing_drift import expert_loads, routing_drift, token_batches

REPO = Path(__file__).resolve().parent.parent


def naive_js(p: list[float], q: list[float]) -> float:
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return sum(0.5 * a * math.log2(a / c) for a, c in zip(p, m) if a) + sum(
        0.5 * b * math.log2(b / c) for b, c in zip(q, m) if b)


def test_js_divergence_equals_the_formula_and_its_bounds():
    assert js_divergence(torch.tensor([3, 0, 5]), torch.tensor([6, 0, 10])) == 0
    assert js_divergence(torch.tensor([1, 0]), torch.tensor([0, 4])) == pytest.approx(1.0)
    p, q = [5, 1, 0, 7, 3], [2, 2, 4, 1, 0]
    assert js_divergence(torch.tensor(p), torch.tensor(q)) == pytest.approx(naive_js(p, q), rel=1e-12)


@pytest.fixture(scope="module")
def text_data(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tests' corpus as token shards in the tiny checkpoint's tokenizer, half of it held out."""
    folder = tmp_path_factory.mktemp("routing")
    (folder / "text").mkdir()
    for i in range(6):  # one document per file
        (folder / "text" / f"{i}.txt").write_text(CORPUS[i * 300:] + CORPUS)
    subprocess.run([sys.executable, "-m", "data_prep", "--source", str(folder / "text"), "--tokenizer-from",
                    str(tiny_checkpoint), "--val-fraction", "0.5", "--out", str(folder / "data"), "--no-progress"],
                   cwd=REPO, check=True, capture_output=True)
    return folder / "data"


def rerouted_copy(loaded: LoadedModel, out: Path, away: list[int], towards: int) -> Path:
    """An export of `loaded` whose first MoE layer's biases keep every token from the experts `away`, and whose
    second MoE layer's bias sends every token to expert `towards`; nothing else changed."""
    model = load_for_inference(loaded.source).model
    (_, first), (_, second) = model.moe_layers(include_mtp=False)[:2]
    with torch.no_grad():
        first.gate.e_score_correction_bias[away] = -1e4
        second.gate.e_score_correction_bias[towards] = 1e4
    return export(LoadedModel(model, loaded.tokenizer, loaded.tokenizer_info, loaded.source, loaded.training), out,
                  dtype=torch.float32)


def test_identical_models_drift_by_nothing_and_rerouted_experts_are_named(tiny_checkpoint, text_data, tmp_path):
    base = load_for_inference(tiny_checkpoint)
    shards = TokenShards(text_data)
    base_loads = expert_loads(base.model, token_batches(shards, 64, batches=2))
    same = routing_drift(base.model, load_for_inference(tiny_checkpoint).model, base_loads,
                         expert_loads(load_for_inference(tiny_checkpoint).model, token_batches(shards, 64, batches=2)))
    assert [(d.js, d.became_dead, d.became_hot, d.bias_max_move) for d in same] == [(0.0, [], [], 0.0)] * 2

    away = base_loads[0].argsort(descending=True)[:2].sort().values.tolist()  # the two busiest experts of layer 1
    towards = int(base_loads[1].argmin())  # the quietest expert of layer 2 (not hot in the base)
    tuned = load_for_inference(rerouted_copy(base, tmp_path / "tuned", away, towards))
    tuned_loads = expert_loads(tuned.model, token_batches(shards, 64, batches=2))
    drift = routing_drift(base.model, tuned.model, base_loads, tuned_loads)
    assert drift[0].became_dead == away and tuned_loads[0, away].sum() == 0
    assert tuned_loads[0].sum() == base_loads[0].sum()  # the same tokens went elsewhere
    assert drift[0].js > 0 and drift[0].bias_max_move == pytest.approx(1e4)
    assert drift[1].became_hot == [towards] and drift[1].bias_max_move == pytest.approx(1e4)


def test_eval_routing_prints_the_drift_and_draws_the_chart(tiny_checkpoint, text_data, tmp_path):
    base = load_for_inference(tiny_checkpoint)
    tuned = rerouted_copy(base, tmp_path / "tuned", [0, 1], 2)
    result = subprocess.run([sys.executable, "launch/eval.py", "--routing", str(tiny_checkpoint), str(tuned), "--data",
                             str(text_data), "--batches", "1", "--chart-dir", str(tmp_path / "charts"), "--json"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])["data"][str(text_data)]
    assert [layer["layer"] for layer in report["layers"]] == [1, 2] and report["content"] == "text"
    assert all(layer["js"] > 0 and layer["bias_max_move"] == pytest.approx(1e4) for layer in report["layers"])
    chart = Image.open(report["chart"])
    assert chart.format == "PNG" and chart.height > 300
