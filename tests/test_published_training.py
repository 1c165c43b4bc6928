"""Training from published-architecture weights end to end: `python launch/train.py --init-from HF_DIR` on a
deepseek_v2 and a deepseek_v3 directory, the run exported back to its original model_type and loaded by
transformers with the run's logits; and loading shard by shard: with expert parallelism each rank reads only its
experts (bytes counted by the reader, summary.json `init_from`) and needs about half the memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_dirs import SMALL_LIKE, V2_LIKE, V3_LIKE, mtp_tensors, save_directory, transformers_model
from launching import REPO, train

pytestmark = pytest.mark.multiprocess
import transformers

SHORT = ["--seq-len", "64", "--micro-batch", "2", "--eval-interval", "1000", "--sample-tokens", "0",
         "--log-interval", "1"]


@pytest.mark.parametrize("model_type, config", [("deepseek_v2", V2_LIKE), ("deepseek_v3", V3_LIKE)])
def test_fine_tuned_from_a_transformers_directory_exports_as_its_model_type(prepared_data, fp32_zero2, tmp_path,
                                                                           model_type, config):
    from gpt_moe.checkpoint.loading import load_for_inference

    base = transformers_model(model_type, **{**config, "vocab_size": 1024})
    directory = save_directory(base, tmp_path / "hf", extra=mtp_tensors(base) if model_type == "deepseek_v3" else {})
    run_dir = tmp_path / "run"
    train("--deepspeed", str(fp32_zero2), "--init-from", str(directory), "--data", str(prepared_data), "--run-dir",
          str(run_dir), "--max-steps", "2", "--save-interval", "2", *SHORT, ranks=0)
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    assert len(history) == 2 and (history[0]["train/mtp_loss"] > 0) == (model_type == "deepseek_v3")
    out = tmp_path / "export"
    subprocess.run([sys.executable, "launch/export.py", str(run_dir), str(out)], cwd=REPO, check=True,
                   capture_output=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_for_inference(run_dir).model
    tokens = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-5
        trained, started = ours.state_dict(), transformers_model(model_type, **{**config, "vocab_size": 1024})
        assert not torch.equal(trained["model.layers.1.self_attn.o_proj.weight"],
                               started.state_dict()["model.layers.1.self_attn.o_proj.weight"])  # it trained


def init_from_reports(run_dir) -> tuple[list[dict], float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["init_from"], summary["history"][0]["train/loss"]


def test_with_expert_parallelism_each_rank_reads_only_its_experts_in_half_the_memory(prepared_data, fp32_zero2,
                                                                                     tmp_path):
    """A `small`-like deepseek_v2 directory (bf16, one tensor per expert as released; 40M parameters, 94% of them
    routed experts) loaded for --init-from on 1 rank, on 2 ranks with --ep-size 2 (ZeRO-2), and on 2 ranks with
    --ep-size 2 under ZeRO-3 (module by module, each read by the rank that broadcasts it). Each rank of the 2-rank
    runs reads exactly half the expert bytes; under ZeRO-2 every rank reads the other weights, under ZeRO-3 only
    rank 0. The memory of building and loading the model (peak minus the resident set before) of a 2-rank ZeRO-2
    rank is below 0.65x the 1-rank load's. All three start from the same weights: the same first loss."""
    model = transformers_model("deepseek_v2", **SMALL_LIKE).to(torch.bfloat16)
    directory = save_directory(model, tmp_path / "hf")
    expert_bytes = sum(p.numel() * 2 for name, p in model.named_parameters() if ".mlp.experts." in name)
    zero3 = tmp_path / "zero3_fp32.json"
    zero3.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero3.json").read_text()),
                                 "bf16": {"enabled": False}}))
    common = ["--init-from", str(directory), "--data", str(prepared_data), "--max-steps", "1", "--seq-len", "64",
              "--micro-batch", "2", "--eval-batches", "1", "--sample-tokens", "0", "--log-interval", "1"]
    runs = {"one": (0, fp32_zero2, ["--grad-accum", "2"]), "two": (2, fp32_zero2, ["--ep-size", "2"]),
            "two_zero3": (2, zero3, ["--ep-size", "2"])}
    reports, losses = {}, {}
    for name, (ranks, ds, extra) in runs.items():
        train("--deepspeed", str(ds), "--run-dir", str(tmp_path / name), *common, *extra, ranks=ranks)
        reports[name], losses[name] = init_from_reports(tmp_path / name)
    (one,), two, two_zero3 = reports["one"], reports["two"], reports["two_zero3"]
    assert one["expert_bytes_read"] == expert_bytes
    other_bytes = one["bytes_read"] - expert_bytes
    for rank, report in enumerate(two):
        assert report["expert_bytes_read"] == expert_bytes // 2, report
        assert report["bytes_read"] - report["expert_bytes_read"] == other_bytes, report
    for rank, report in enumerate(two_zero3):
        assert report["expert_bytes_read"] == expert_bytes // 2, report
        assert report["bytes_read"] - report["expert_bytes_read"] == (other_bytes if rank == 0 else 0), report

    def load_memory(report: dict) -> float:
        return report["memory_peak_gib"] - report["memory_before_gib"]

    assert max(load_memory(report) for report in two) < 0.65 * load_memory(one), (one, two)
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["two_zero3"] == pytest.approx(losses["one"], rel=1e-5)
