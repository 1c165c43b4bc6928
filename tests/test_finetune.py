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


@pytest.fixture(scope="module")
def chat_data(prepared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "chat-builtin"
    subprocess.run([sys.executable, "-m", "data_prep", "--format", "chat", "--source", "builtin-chat",
                    "--tokenizer-from", str(prepared_data), "--max-seq-len", "257", "--out", str(out),
                    "--no-progress"], cwd=REPO, check=True, capture_output=True)
    return out


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
        base_run, chat_data, fp32_zero2, tmp_path):
    import transformers

    export = tmp_path / "export"
    subprocess.run([sys.executable, "launch/export.py", str(base_run), str(export), "--dtype", "float32"], cwd=REPO,
                   check=True, capture_output=True)
    hf_dir = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_pretrained(export).save_pretrained(hf_dir)
    first = {}
    for name, source in (("checkpoint", base_run), ("export", export), ("transformers", hf_dir)):
        run_dir = tmp_path / f"from-{name}"
        run("--deepspeed", str(fp32_zero2), "--init-from", str(source), "--data", str(chat_data), "--run-dir",
            str(run_dir), "--max-steps", "1", "--save-interval", "100", *FINETUNE)
        first[name] = history(run_dir)[0]
    # the language-model loss is bit-identical; transformers has no MTP block, so there it starts fresh
    assert first["checkpoint"]["train/lm_loss"] == first["export"]["train/lm_loss"] == \
        first["transformers"]["train/lm_loss"]
    assert first["checkpoint"]["train/mtp_loss"] == first["export"]["train/mtp_loss"]


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


def mtp_acceptance_events(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars("eval/mtp_acceptance")]


def test_mtp_acceptance_is_evaluated_and_recorded_in_pretraining_and_fine_tuning(base_run, prepared_data, chat_data,
                                                                                fp32_zero2, tmp_path):
    """eval/mtp_acceptance reaches TensorBoard and the checkpoint's COMPLETE record, for both kinds of run."""
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    run("--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir", str(pre), "--max-steps", "2",
        "--seq-len", "64", "--micro-batch", "4", "--save-interval", "2", "--eval-interval", "2", "--eval-batches", "2",
        "--sample-tokens", "0")
    run("--deepspeed", str(fp32_zero2), "--init-from", str(base_run), "--data", str(chat_data), "--run-dir", str(sft),
        "--max-steps", "2", "--save-interval", "2", *FINETUNE, "--eval-interval", "2")
    for run_dir in (pre, sft):
        record = json.loads((run_dir / "checkpoints" / "step_00000002" / "COMPLETE").read_text())
        logged = mtp_acceptance_events(run_dir)
        assert len(logged) == 1 and 0.0 <= record["mtp_acceptance"] <= 1.0, run_dir
        assert logged[0] == pytest.approx(record["mtp_acceptance"]), run_dir
