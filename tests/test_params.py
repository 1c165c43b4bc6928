"""Closed-form parameter/KV/FLOP accounting against real models and the published DeepSeek figures."""

import json
import subprocess
import sys

import pytest
import torch

from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.params import account


@pytest.mark.parametrize("name", ["tiny", "small", "deepseek-v2-lite", "deepseek-v3"])
def test_total_matches_the_parameters_of_a_built_model(name):
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config, seed=None)
    built = sum(p.numel() for p in model.parameters())
    a = account(config)
    assert a.total_params + a.mtp_params == built


def test_active_count_equals_parameters_a_single_token_touches(small_config):
    """Backprop and count what received gradient: whole tensors, routed experts per slice.

    Two tokens (with one, attention weights are constant and queries get no gradient); a large
    bias on experts 0..k-1 makes both tokens choose the same k experts, as one token would."""
    config = small_config.replace(num_nextn_predict_layers=0, seq_aux_loss_coef=0.0)
    model = DeepSeekForCausalLM(config, seed=0)
    for _, moe in model.moe_layers():
        moe.gate.e_score_correction_bias[: config.num_experts_per_tok] = 100.0
    out = model(torch.tensor([[5, 9]]), labels=torch.tensor([[7, 3]]))
    out.loss.backward()
    touched = 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            continue  # a lookup reads one row; excluded by convention (see gpt_moe.model.params)
        if ".experts." in name:
            touched += sum(block.numel() for block in p.grad if block.abs().sum() > 0)
        elif p.grad is not None and p.grad.abs().sum() > 0:
            touched += p.numel()
    assert touched == account(config).active_params


def test_published_deepseek_figures():
    v3 = account(ModelConfig.from_preset("deepseek-v3"))
    assert v3.total_params == pytest.approx(671e9, rel=0.01)
    # "37B activated" is rounded: the exact count is 36.63B (37.55B if the embedding table is counted)
    assert v3.active_params == pytest.approx(37e9, rel=0.011)
    assert v3.mtp_params + 2 * 129280 * 7168 == pytest.approx(14e9, rel=0.05)  # released MTP has own emb/head
    lite = account(ModelConfig.from_preset("deepseek-v2-lite"))
    assert lite.total_params == pytest.approx(15.7e9, rel=0.01)
    assert lite.active_params == pytest.approx(2.4e9, rel=0.03)


def test_kv_cache_sizes_closed_form():
    c = ModelConfig.from_preset("deepseek-v3")
    a = account(c)
    assert a.kv_cache_bytes_per_token == 61 * (512 + 64) * 2  # latent + shared rope key, bf16
    assert a.mha_kv_cache_bytes_per_token == 61 * 128 * (192 + 128) * 2


def test_flops_are_six_n_plus_attention():
    c = ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=0)
    a = account(c, seq_len=256)
    attention = 3 * 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 128
    assert a.flops_per_token == 6 * a.active_params + attention


def test_cli_json_has_the_documented_keys():
    out = subprocess.run([sys.executable, "-m", "gpt_moe.model.params", "deepseek-v3", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert {"total_params", "active_params", "kv_cache_bytes_per_token", "flops_per_token"} <= set(data)
    bad = subprocess.run([sys.executable, "-m", "gpt_moe.model.params", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown model preset 'nope'" in bad.stderr
