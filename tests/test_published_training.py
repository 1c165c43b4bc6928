"""Training from published-architecture weights end to end: `python launch/train.py --init-from HF_DIR` on a
deepseek_v2 and a deepseek_v3 directory, the run exported back to its original model_type and loaded by
transformers with the run's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hf_dirs import V2_LIKE, V3_LIKE, mtp_tensors, save_directory, transformers_model
from launching import REPO, train

pytestmark = pytest.mark.multiprocess
transformers = pytest.importorskip("transformers")
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
