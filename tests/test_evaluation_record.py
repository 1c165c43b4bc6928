"""The evaluation record (`gpt_moe.checkpoint.evaluation`): its round trip through a checkpoint's COMPLETE record, an
export's training facts and a fine-tuning run's parent file; older records read; the tables of `launch/eval.py` and
the model card, with their differences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_routing_drift import naive_js

from gpt_moe.checkpoint.evaluation import Evaluation, figure_table
from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.checkpoint.records import CheckpointRecord, Layout, TrainingFacts, read_record, write_record
from gpt_moe.errors import CheckpointError
from gpt_moe.model.routing_drift import LayerDrift
from gpt_moe.train.evaluator import EvaluationResult, ParentRouting

REPO = Path(__file__).resolve().parent.parent
PARENT = Evaluation({"val_loss": 4.0, "val_bpb": 1.9, "humaneval_bpb": 2.06, "humaneval_problems": 32.0,
                     "chat_end_prob": 0.015}, step=0)
TUNED = Evaluation({"val_loss": 3.5, "val_bpb": 1.7, "humaneval_bpb": 2.98, "humaneval_problems": 32.0,
                    "chat_end_prob": 0.805, "mtp_acceptance": 0.25, "made_up_figure": 7.0}, step=300,
                   drift=(LayerDrift(1, 0.027, [], [14], 0.088, 0.2), LayerDrift(2, 0.103, [3, 5], [], 0.1, 0.3)),
                   parent=PARENT)


def test_an_evaluation_survives_the_complete_record_and_older_readers_find_its_headline(tmp_path):
    record = CheckpointRecord(300, Layout(2, 2, 2, False), 1000, ((0, 8), (8, 16)), "tiny", True, "runs/tiny",
                              evaluation=TUNED)
    write_record(tmp_path, record)
    back = read_record(tmp_path)
    assert back.evaluation == TUNED and back.facts.evaluation == TUNED
    assert (back.val_loss, back.val_bpb, back.mtp_acceptance) == (3.5, 1.7, 0.25)
    flat = json.loads((tmp_path / "COMPLETE").read_text())
    assert (flat["val_loss"], flat["val_bpb"], flat["mtp_acceptance"]) == (3.5, 1.7, 0.25)  # as 0.1 wrote them
    assert flat["evaluation"]["drift"][1]["became_dead"] == [3, 5]

    unevaluated = CheckpointRecord(5, Layout(1, 1, 2, None))
    write_record(tmp_path, unevaluated)
    back = read_record(tmp_path)
    assert back.evaluation is None and math.isnan(back.val_loss) and back.val_bpb is None


def test_a_record_of_gpt_moe_0_1_reads_its_figures_as_an_evaluation():
    record = read_record(REPO / "tests" / "fixtures" / "run_v0_1" / "run" / "checkpoints" / "step_00000002")
    assert record.evaluation == Evaluation({"val_loss": 5.706538915634155, "mtp_acceptance": 0.13709677419354838},
                                           step=2)
    assert record.val_bpb is None
    export_facts = load_for_inference(REPO / "tests" / "fixtures" / "run_v0_1" / "export").training
    assert export_facts.val_loss == pytest.approx(5.706538915634155) and export_facts.evaluation.parent is None


def test_training_facts_round_trip_and_a_malformed_evaluation_is_one_line(tmp_path):
    facts = TrainingFacts(300, 1000, True, False, "tiny", "runs/tiny", TUNED)
    assert TrainingFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
    assert TrainingFacts.from_dict({"step": 3, "val_loss": 2.5}).evaluation == Evaluation({"val_loss": 2.5}, 3)
    with pytest.raises(CheckpointError, match="gpt_moe.json: training: malformed evaluation record"):
        TrainingFacts.from_dict({"evaluation": {"figures": {"val_loss": "low"}}}, "gpt_moe.json: training")


def table_rows(text: str) -> dict[str, list[str]]:
    """A markdown table's body: first cell -> the other cells."""
    lines = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in lines[2:]}


def test_the_model_card_tables_the_parent_beside_the_fine_tuned_model(tmp_path, tiny_checkpoint):
    loaded = load_for_inference(tiny_checkpoint)
    loaded.training = TrainingFacts(300, 1000, True, False, "tiny", "runs/tiny", TUNED)
    card = (export(loaded, tmp_path / "export", dtype=torch.float32) / "README.md").read_text()
    table = card[card.index("## Evaluation"):]
    rows = table_rows(table)
    assert table.count("| figure | before fine-tuning | after (step 300) | difference |") == 1
    assert rows["validation loss, nats/token"] == ["4.0000", "3.5000", "-0.5000"]
    assert rows["HumanEval canonical solutions, bits per byte"] == ["2.0600", "2.9800", "+0.9200"]
    assert rows["end-of-turn probability where the reference ends (teacher-forced)"] == ["1.5%", "80.5%", "+79.0%"]
    assert rows["MTP draft acceptance (teacher-forced)"] == ["-", "25.0%", "-"]
    assert rows["HumanEval problems scored (the first by task id)"] == ["32", "32", "+0"]
    assert rows["routing drift from the parent, JS bits: layer 2"] == ["-", "0.1030", "-"]
    assert rows["made_up_figure"] == ["-", "7.0000", "-"]
    assert list(rows)[:2] == ["validation loss, nats/token", "validation bits per byte (text tokens)"]

    loaded.training = TrainingFacts(4, 100)  # never evaluated: no section
    assert "## Evaluation" not in (export(loaded, tmp_path / "bare", dtype=torch.float32) / "README.md").read_text()


def test_the_text_table_aligns_one_or_two_columns():
    one = figure_table([("A", PARENT)]).splitlines()
    assert one[0].split() == ["figure", "A"] and len({len(line) for line in one}) == 1  # values right-aligned
    two = figure_table([("A", PARENT), ("B", TUNED)]).splitlines()
    assert two[0].split() == ["figure", "A", "B", "difference"]
    loss = next(line for line in two if line.startswith("validation loss"))
    assert loss.split()[-3:] == ["4.0000", "3.5000", "-0.5000"]


def test_the_parent_file_round_trips_and_the_drift_is_the_js_of_the_loads(tmp_path, tiny_checkpoint):
    model = load_for_inference(tiny_checkpoint).model
    layers = [layer for layer, _ in model.moe_layers(False)]
    parent_loads = torch.tensor([[5, 0, 3, 8] + [1] * 12, [2] * 16])
    parent = ParentRouting.measured(EvaluationResult(PARENT, parent_loads, None), model)
    parent.save(tmp_path)
    back = ParentRouting.load(tmp_path)
    assert back == parent and back.layers == layers
    tuned_loads = torch.tensor([[0, 4, 3, 9] + [1] * 12, [4, 0] * 8])
    with torch.no_grad():
        model.moe_layers(False)[1][1].gate.e_score_correction_bias[3] += 0.5
    evaluation = back.compare(EvaluationResult(Evaluation({"val_loss": 3.0}, 7), tuned_loads, None), model)
    assert evaluation.parent == PARENT and evaluation.figures == {"val_loss": 3.0}
    for drift, p, q in zip(evaluation.drift, parent_loads.tolist(), tuned_loads.tolist()):
        assert drift.js == pytest.approx(naive_js(p, q), rel=1e-12)
    assert evaluation.drift[0].became_dead == [0] and evaluation.drift[1].became_dead == list(range(1, 16, 2))
    assert evaluation.drift[1].bias_max_move == pytest.approx(0.5) and evaluation.drift[0].bias_max_move == 0
    other_tokens = EvaluationResult(Evaluation({}, 7), tuned_loads * 2, None)  # a resume on another layout
    assert back.compare(other_tokens, model).drift == ()
    assert ParentRouting.load(tmp_path / "missing") is None


def test_eval_full_suite_of_an_export_scores_all_problems_and_the_chat_figures(tiny_checkpoint, tmp_path):
    """An export has no run directory: no validation figures unless --data; --suite full scores all 164 HumanEval
    problems and, for a chat model, the held-out chat figures (data/chat-builtin prepared in its tokenizer)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(REPO / "launch" / "eval.py"), str(tiny_checkpoint), "--suite", "full", "--items",
               "2", "--max-new-tokens", "4", "--json"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.splitlines()[-1])
    assert output["validation_data"] is None and output["checkpoints"] == [str(tiny_checkpoint)]
    figures = output["evaluations"][0]["figures"]
    assert figures["humaneval_problems"] == 164 and "val_loss" not in figures
    assert {"held_out_assistant_loss", "held_out_assistant_bpb", "chat_replies_ended",
            "chat_exact_in_context"} <= set(figures)
    missing = subprocess.run(command[:3] + ["--data", str(tmp_path / "nowhere")], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith(f"error: {tmp_path / 'nowhere'}: no prepared data")
