"""Chat fine-tuning end to end: --init-from any kind of weights, packed conversations, the loss on assistant tokens
only, expert parallelism, a frozen router, and the refusals that come before any engine starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, train

pytestmark = pytest.mark.multiprocess
FINETUNE = ["--seq-len", "256", "--micro-batch", "2", "--grad-accum", "2", "--log-interval", "1", "--lr", "3e-4",
            "--warmup-steps", "2", "--eval-interval", "1000", "--eval-batches", "2", "--sample-tokens", "0"]


def run(*args: str, ranks: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """`python launch/train.py ARGS` (ranks=0) or `deepspeed --num_gpus RANKS launch/train.py ARGS`."""
    return train(*args, ranks=ranks, check=check)


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["history"]


def test_expert_parallel_fine_tuning_equals_one_copy_of_the_experts(base_run, chat_data, fp32_zero2, tmp_path):
    """5 fine-tuning steps on 2 ranks: --ep-size 2 gives the losses and clipped norms of --ep-size 1 (fp32)."""
    runs = {}
    for ep in (1, 2):
        runs[ep] = tmp_path / f"ep{ep}"
        run("--deepspeed", str(fp32_zero2), "--init-from", str(base_run), "--data", str(chat_data), "--run-dir",
            str(runs[ep]), "--max-steps", "5", "--save-interval", "5", "--ep-size", str(ep), *FINETUNE, ranks=2)
    one, two = history(runs[1]), history(runs[2])
    assert [h["step"] for h in one] == [h["step"] for h in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        for key in ("train/loss", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    assert one[-1]["train/trained_tokens"] > 0


def test_init_from_a_checkpoint_its_export_and_its_transformers_directory_starts_the_same(
        base_run, prepared_data, chat_data, fp32_zero2, tmp_path):
    """The same first losses from the three forms of one model, each mixing the same pretraining text into its rows
    (--mix-data: an export or a transformers directory does not know its pretraining data)."""
    import transformers

    export = tmp_path / "export"
    subprocess.run([sys.executable, "launch/export.py", str(base_run), str(export), "--dtype", "float32"], cwd=REPO,
                   check=True, capture_output=True)
    hf_dir = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_pretrained(export).save_pretrained(hf_dir)
    first = {}
    for name, source in (("checkpoint", base_run), ("export", export), ("transformers", hf_dir)):
        run_dir = tmp_path / f"from-{name}"
        started = run("--deepspeed", str(fp32_zero2), "--init-from", str(source), "--data", str(chat_data),
                      "--run-dir", str(run_dir), "--max-steps", "1", "--save-interval", "100", "--mix-data",
                      str(prepared_data), *FINETUNE)
        assert f"1 of every 2 rows from {prepared_data} (--mix-pretrain 0.125)" in started.stdout
        first[name] = history(run_dir)[0]
    # the language-model loss is bit-identical; transformers has no MTP block, so there it starts fresh
    assert first["checkpoint"]["train/lm_loss"] == first["export"]["train/lm_loss"] == \
        first["transformers"]["train/lm_loss"]
    assert first["checkpoint"]["train/mtp_loss"] == first["export"]["train/mtp_loss"]
    refused = run("--init-from", str(export), "--data", str(chat_data), "--mix-pretrain", "0.5", "--run-dir",
                  str(tmp_path / "x"), check=False)
    assert refused.returncode == 2 and "the pretraining data of" in refused.stderr and "--mix-data" in refused.stderr
    # a resumed run keeps its own mix: one from before --mix-pretrain (no such key in its config) resumes unmixed
    config_file = tmp_path / "from-checkpoint" / "train_config.json"
    config = json.loads(config_file.read_text())
    assert (config["mix_pretrain"], config["mix_data"]) == (0.125, str(prepared_data))
    config_file.write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("mix_")}))
    resumed = run("--deepspeed", str(fp32_zero2), "--init-from", str(base_run), "--data", str(chat_data), "--run-dir",
                  str(tmp_path / "from-checkpoint"), "--max-steps", "2", "--dry-run", *FINETUNE)
    assert "resume from" in resumed.stdout
    assert "(--mix-pretrain): off, as the run being resumed trained" in resumed.stdout


def test_a_frozen_router_stays_bit_identical_while_the_experts_learn(base_run, chat_data, fp32_zero2, tmp_path):
    from gpt_moe.checkpoint.loading import load_for_inference

    run_dir = tmp_path / "frozen"
    run("--deepspeed", str(fp32_zero2), "--init-from", str(base_run), "--data", str(chat_data), "--run-dir",
        str(run_dir), "--max-steps", "10", "--save-interval", "10", "--freeze-router", *FINETUNE)
    before, after = (load_for_inference(path).model.state_dict() for path in (base_run, run_dir))
    routers = [key for key in before if ".mlp.gate." in key]
    assert routers and all(torch.equal(before[key], after[key]) for key in routers)
    experts = [key for key in before if ".mlp.experts." in key]
    assert experts and all(not torch.equal(before[key], after[key]) for key in experts)


def test_chat_data_needs_init_from_and_the_base_models_tokenizer(base_run, chat_data, tmp_path):
    result = run("--data", str(chat_data), "--run-dir", str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and "chat data is for fine-tuning: add --init-from" in result.stderr
    other = tmp_path / "other"
    shutil.copytree(chat_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    result = run("--init-from", str(base_run), "--data", str(other), "--run-dir", str(tmp_path / "y"), check=False)
    assert result.returncode == 2 and "prepare the data with --tokenizer-from" in result.stderr


def logged_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def recomputed_drift(base_run: Path, tuned_run: Path, chat_data: Path) -> list:
    """The routing drift of `tuned_run` from `base_run` on the validation batches the fine-tuning run read (one rank,
    FINETUNE's shape), from the saved weights through `launch/eval.py --routing`'s functions."""
    from gpt_moe.checkpoint.loading import load_for_inference
    from gpt_moe.data.chat_batches import ChatValBatches
    from gpt_moe.data.shards import TokenShards
    from gpt_moe.model.loss import IGNORE_INDEX
    from gpt_moe.serve.routing_drift import expert_loads, routing_drift

    base, tuned = (load_for_inference(path).model for path in (base_run, tuned_run))
    batches = ChatValBatches(TokenShards(chat_data), 256, 2, 2)
    loads = [expert_loads(model, [(b.model_inputs(), b.labels != IGNORE_INDEX) for b in batches])
             for model in (base, tuned)]
    return routing_drift(base, tuned, *loads)


def test_the_evaluation_suite_is_logged_recorded_and_repeated_by_eval_py(base_run, prepared_data, chat_data,
                                                                         fp32_zero2, tmp_path):
    """A pretraining and a fine-tuning run long enough for the suite (--eval-interval 2 of 2 steps): every figure
    reaches TensorBoard as eval/<name> and the COMPLETE record; the fine-tuning run evaluates its parent before step 1
    and records the routing drift from it, equal to the drift recomputed from the saved weights; `launch/eval.py
    --compare` repeats both records' figures."""
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    run("--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir", str(pre), "--max-steps", "2",
        "--seq-len", "64", "--micro-batch", "4", "--save-interval", "2", "--eval-interval", "2", "--eval-batches", "2",
        "--sample-tokens", "0")
    run("--deepspeed", str(fp32_zero2), "--init-from", str(base_run), "--data", str(chat_data), "--run-dir", str(sft),
        "--max-steps", "2", "--save-interval", "2", *FINETUNE, "--eval-interval", "2")
    records = {run_dir: json.loads((run_dir / "checkpoints" / "step_00000002" / "COMPLETE").read_text())["evaluation"]
               for run_dir in (pre, sft)}
    for run_dir, evaluation in records.items():
        figures, logged = evaluation["figures"], logged_scalars(run_dir)
        assert {"val_loss", "val_bpb", "mtp_acceptance", "humaneval_bpb"} <= set(figures), run_dir
        assert figures["humaneval_problems"] == 32 and 0.0 <= figures["mtp_acceptance"] <= 1.0
        for name, value in figures.items():
            assert logged[f"eval/{name}"][-1] == (2, pytest.approx(value)), (run_dir, name)
    parent, figures = records[sft]["parent"], records[sft]["figures"]
    assert parent["step"] == 0 and 0.0 < figures["chat_end_prob"] < 1.0
    assert parent["figures"]["humaneval_bpb"] != figures["humaneval_bpb"]  # the same problems, other weights
    assert [step for step, _ in logged_scalars(sft)["eval/val_loss"]] == [0, 2]
    expected = recomputed_drift(base_run, sft, chat_data)
    assert [d["layer"] for d in records[sft]["drift"]] == [d.layer for d in expected] == [1, 2, 3]
    for drift, again in zip(records[sft]["drift"], expected):
        assert drift["js"] == pytest.approx(again.js, rel=1e-6, abs=1e-9)
        assert drift["bias_max_move"] == pytest.approx(again.bias_max_move)
        assert logged_scalars(sft)[f"eval/routing_js_layer{drift['layer']}"] == [(2, pytest.approx(drift["js"]))]

    compared = subprocess.run([sys.executable, "launch/eval.py", "--compare", str(pre), str(sft), "--json"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stderr[-3000:]
    result = json.loads(compared.stdout.splitlines()[-1])
    assert result["validation_data"] == str(prepared_data)  # the first checkpoint's run's
    again = [e["figures"] for e in result["evaluations"]]
    for name, value in records[pre]["figures"].items():  # the same batches, weights and problems as the run's
        assert again[0][name] == pytest.approx(value, rel=1e-5), name
    assert again[1]["humaneval_bpb"] == pytest.approx(figures["humaneval_bpb"], rel=1e-5)
