"""What gpt-moe 0.1 wrote keeps working: `tests/fixtures/run_v0_1` holds a 2-rank, EP=2, ZeRO-2 run of a micro
model, its export and its layout-free conversion, all written by 0.1 (the flat package, before the move into wings;
see its README.md), and what 0.1 computed from them. Each form loads with 0.1's logits, exports and reshards to
0.1's bytes, opens in the app and the sampler, and resumes with 0.1's losses, on one rank (converted) and on two
(DeepSpeed's own loader)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, train
from safetensors.torch import load_file

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.checkpoint.model_dir import ModelDirectory
from gpt_moe.checkpoint.reshard import convert
from gpt_moe.serve.chat_app import ChatApp, model_facts

FIXTURE = REPO / "tests" / "fixtures" / "run_v0_1"
TAG = FIXTURE / "run" / "checkpoints" / "step_00000002"
IDS = torch.arange(3, 35).view(1, 32) % 300
# fp32 throughout: on the CPU kind that wrote the fixture the figures agree bit for bit; another kind's fp32 kernels
# (AVX2 rather than AVX-512, another summation order) may differ in the last bits of each matmul
LOGITS_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
RESUME_RTOL = 1e-4  # one optimizer step (Adam divides by tiny second moments) amplifies such bits


@pytest.mark.parametrize("form", ["run", "export", "layout_free"])
def test_each_form_loads_with_the_logits_0_1_computed(form):
    expected = load_file(FIXTURE / "expected_logits.safetensors")["export" if form == "export" else "run"]
    loaded = load_for_inference(FIXTURE / form)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS).logits[0], expected, **LOGITS_TOLERANCE)
    assert loaded.training.step == 2 and loaded.training.tokens_seen == 256 and loaded.training.bf16 is False


def test_the_records_read_as_0_1_wrote_them():
    directory = ModelDirectory.open(FIXTURE / "run")
    assert directory.path == TAG and directory.kind == "checkpoint"
    layout = directory.record.layout
    assert (layout.world_size, layout.ep_size, layout.zero_stage, layout.bf16) == (2, 2, 2, False)
    assert directory.record.expert_ranges == ((0, 4), (4, 8))
    assert ModelDirectory.open(FIXTURE / "layout_free").record.source.endswith("step_00000002")
    assert ModelDirectory.open(FIXTURE / "export").config == directory.config


def test_it_exports_and_reshards_to_the_tensors_0_1_wrote(tmp_path):
    out = export(load_for_inference(FIXTURE / "run"), tmp_path / "export", dtype=torch.float32)
    for file in ("model.safetensors", "mtp.safetensors"):
        ours, theirs = load_file(out / file), load_file(FIXTURE / "export" / file)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.tiktoken"):
        assert (out / file).read_bytes() == (FIXTURE / "export" / file).read_bytes(), file
    converted = convert(TAG, tmp_path / "layout_free", progress=False)
    files = sorted(p.relative_to(FIXTURE / "layout_free") for p in (FIXTURE / "layout_free" / "params").rglob("*.pt"))
    assert files == sorted(p.relative_to(converted) for p in (converted / "params").rglob("*.pt"))
    for file in files:
        ours, theirs = torch.load(converted / file), torch.load(FIXTURE / "layout_free" / file)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), file


def test_the_app_and_the_sampler_open_it():
    app = ChatApp(load_for_inference(FIXTURE / "export"), max_new_tokens=8)
    assert dict(model_facts(app.loaded))["training"] == "step 2, 256 tokens"
    *_, last = app.respond("def main(", [], temperature=0.0, max_new_tokens=8)
    assert last[1][-1]["role"] == "assistant"
    result = subprocess.run([sys.executable, "launch/sample.py", "--checkpoint", str(FIXTURE / "run"),
                             "--max-new-tokens", "8", "--temperature", "0", "def main("],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]


def resume(tmp_path: Path, ranks: int) -> dict:
    """Step 3 of the fixture run resumed with the current code (the data copied: verification writes beside it)."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE / "data", data)
    layout = ["--ep-size", "2", "--micro-batch", "2"] if ranks == 2 else ["--micro-batch", "4"]
    train("--model", str(FIXTURE / "model.json"), "--resume", str(FIXTURE / "run"), "--data", str(data),
          "--deepspeed", str(FIXTURE / "zero2_fp32.json"), "--seq-len", "32", "--max-steps", "3",
          "--save-interval", "100", "--eval-interval", "100", "--log-interval", "1", "--sample-tokens", "0",
          "--warmup-steps", "1", "--run-dir", str(tmp_path / "run"), *layout, ranks=ranks)
    records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    return [record for record in records if "train/loss" in record][-1]  # the last step (not an evaluation)


def assert_as_0_1_resumed(step: dict) -> None:
    expected = json.loads((FIXTURE / "expected_resume.json").read_text())
    assert step["step"] == expected["step"] == 3
    for key in ("train/loss", "train/lm_loss", "train/mtp_loss", "train/grad_norm"):
        assert step[key] == pytest.approx(expected[key], rel=RESUME_RTOL), key


def test_it_resumes_on_one_rank_with_the_losses_0_1_resumed_with(tmp_path):
    assert_as_0_1_resumed(resume(tmp_path, ranks=0))


@pytest.mark.multiprocess
def test_it_resumes_on_two_ranks_with_deepspeeds_loader_as_0_1_did(tmp_path):
    assert_as_0_1_resumed(resume(tmp_path, ranks=2))


def plan_for(*flags: str, world_size: int = 1):
    from gpt_moe.train.config import parse_train_args
    from gpt_moe.train.hardware import Hardware
    from gpt_moe.train.plan import plan_run

    args = ["--model", str(FIXTURE / "model.json"), "--data", str(FIXTURE / "data"), "--deepspeed",
            str(FIXTURE / "zero2_fp32.json"), "--seq-len", "32", "--micro-batch", "2", *flags]
    cfg, explicit, _ = parse_train_args(args)
    return plan_run(cfg, explicit, world_size, Hardware(bf16_supported=False, bf16_native=False, device_type="cpu"))


def test_the_plan_says_what_a_resume_does_before_anything_starts(tmp_path):
    """RunPlan.resume: the layout it converts from and to, or DeepSpeed's own loader for the same layout; nothing to
    resume in a new run directory; an export refused (weights, no training state). `--dry-run` prints it."""
    converting = plan_for("--resume", str(FIXTURE / "run"))
    assert converting.resume.tag == TAG and converting.resume.convert
    assert (f"resume from {TAG} (step 2, 256 tokens): converting from 2 ranks, EP 2, ZeRO-2, fp32 to 1 rank, EP 1, "
            "ZeRO-2, fp32") in converting.banner()
    same = plan_for("--resume", str(FIXTURE / "run"), "--ep-size", "2", world_size=2)
    assert not same.resume.convert and "the same layout, DeepSpeed's loader" in same.banner()
    assert plan_for("--resume", str(FIXTURE / "layout_free"), "--ep-size", "2", world_size=2).resume.convert
    assert plan_for("--run-dir", str(tmp_path / "new")).resume is None
    from gpt_moe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="an export holds weights only, no training state; .* --init-from"):
        plan_for("--resume", str(FIXTURE / "export"))
    result = subprocess.run([sys.executable, "launch/train.py", "--dry-run", "--model", str(FIXTURE / "model.json"),
                             "--data", str(FIXTURE / "data"), "--seq-len", "32", "--resume", str(FIXTURE / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "converting from 2 ranks, EP 2, ZeRO-2, fp32 to 1 rank" in result.stdout, \
        result.stderr[-2000:]


def test_a_resume_on_another_layout_keeps_the_global_batch_or_says_it_changes():
    """The fixture trained at 2 ranks x 2 sequences x 32 tokens = 128 tokens per step. On one rank at micro-batch 2
    the plan takes --grad-accum 2 (not given); with --grad-accum 1 given it says what changes and what keeps it; at
    micro-batch 3 no accumulation gives 128."""
    kept = plan_for("--resume", str(FIXTURE / "run"))
    assert kept.train.grad_accum == 2 and kept.tokens_per_step == 128
    assert "keeping the checkpoint's global batch with --grad-accum 2" in kept.banner()
    changed = plan_for("--resume", str(FIXTURE / "run"), "--grad-accum", "1")
    assert changed.tokens_per_step == 64 and changed.train.grad_accum == 1
    assert ("the checkpoint trained at 128 tokens per step, this layout at 2 x 32 tokens x 1 accumulation x 1 rank(s) "
            "= 64: the global batch changes; --grad-accum 2 keeps it") in changed.banner()
    odd = plan_for("--resume", str(FIXTURE / "run"), "--micro-batch", "3")
    assert "no --grad-accum keeps it at this --micro-batch" in odd.banner()
    assert plan_for("--resume", str(FIXTURE / "run"), "--ep-size", "2", world_size=2).resume.batch_note is None
