"""bf16 "auto" follows measured speed on CPUs: the DeepSpeed step of the model timed in both precisions in a child
process, cached per machine and shape, and the plan's banner saying why it chose what it chose."""

from __future__ import annotations

import json

import pytest

from gpt_moe.model.config import ModelConfig
from gpt_moe.train.config import TrainConfig
from gpt_moe.train.dtype_choice import CACHE_FILE, MAX_LAYERS, MAX_TOKENS, MIN_SPEEDUP, choose_bf16_on_cpu, timing_job
from gpt_moe.train.hardware import Hardware
from gpt_moe.train.peak_flops import CACHE_ENV
from gpt_moe.train.plan import plan_run

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=6,
             num_attention_heads=2, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
             max_position_embeddings=128)
DS = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
      "gradient_clipping": 1.0, "bf16": {"enabled": True},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
      "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 0, "reduce_bucket_size": 4096}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / CACHE_FILE


def test_the_timed_step_is_the_run_cut_to_a_few_layers_on_one_rank():
    model = ModelConfig.from_dict(SMALL)
    job = timing_job(model, DS, seq_len=64, micro_batch=64)
    assert job["rows"] == MAX_TOKENS // 64 and job["seq_len"] == 64
    assert job["model"]["num_hidden_layers"] == MAX_LAYERS and job["model"]["hidden_size"] == 64
    zero = job["ds_config"]["zero_optimization"]
    assert zero == {"stage": 2, "reduce_bucket_size": 4096}  # ZeRO-3's own keys go with the stage
    assert (job["ds_config"]["train_batch_size"], job["ds_config"]["gradient_accumulation_steps"]) == (32, 1)
    deep_dense = model.replace(first_k_dense_replace=5)
    assert timing_job(deep_dense, DS, 64, 1)["model"]["num_hidden_layers"] == 6  # its dense layers and one MoE layer


def test_the_choice_is_measured_once_then_read_from_the_cache(cache):
    """The child process times DeepSpeed's step in both precisions; the decision follows MIN_SPEEDUP; a second
    call reads the figure instead of measuring."""
    model = ModelConfig.from_dict(SMALL)
    first = choose_bf16_on_cpu(model, DS, seq_len=32, micro_batch=2)
    entries = json.loads(cache.read_text())
    (key, entry), = entries.items()
    assert entry["fp32_s"] > 0 and entry["bf16_s"] > 0
    assert first.speedup == pytest.approx(entry["fp32_s"] / entry["bf16_s"])
    assert first.bf16 == (first.speedup >= MIN_SPEEDUP)
    assert "(measured:" in first.why and "2 x 32 tokens" in first.why and "ZeRO 2" in key
    again = choose_bf16_on_cpu(model, DS, seq_len=32, micro_batch=2)
    assert again == first.__class__(first.bf16, first.speedup, first.why.replace("(measured:", "(cached:"))
    entries[key]["speedup"] = MIN_SPEEDUP + 1  # the decision reads the cached figure
    cache.write_text(json.dumps(entries))
    assert choose_bf16_on_cpu(model, DS, seq_len=32, micro_batch=2).bf16


def test_a_measurement_that_fails_leaves_fp32_and_says_why(cache):
    broken = {**DS, "optimizer": {"type": "NoSuchOptimizer", "params": {}}}
    choice = choose_bf16_on_cpu(ModelConfig.from_dict(SMALL), broken, seq_len=32, micro_batch=2)
    assert not choice.bf16 and choice.speedup is None
    assert choice.why.startswith("auto: fp32, the bf16 step could not be timed (the timing process exited with 1")
    assert not cache.exists()


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_the_banner_says_why_the_run_trains_in_its_precision(setting, cache, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**{k: "auto" for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                      "gradient_accumulation_steps")},
                              "bf16": {"enabled": setting}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                              "zero_optimization": {"stage": 2}}))
    model = tmp_path / "model.json"
    model.write_text(json.dumps(SMALL))
    cfg = TrainConfig(model=str(model), deepspeed_config=str(ds), seq_len=32, micro_batch=2)
    explicit = frozenset({"--model", "--deepspeed", "--seq-len", "--micro-batch"})
    hardware = Hardware.detect()
    plan = plan_run(cfg, explicit, 1, hardware)
    banner = plan.banner()
    assert f"precision: {plan.precision}" in banner
    if setting != "auto":
        dtype = "bf16" if setting else "fp32"
        assert plan.bf16 == setting and plan.precision == f"{dtype}: bf16.enabled {setting} in {ds}"
    elif not hardware.bf16_native:
        assert not plan.bf16 and plan.precision.startswith("auto: fp32, this CPU emulates bf16")
    else:  # a native-bf16 CPU: measured, and the plan follows the measurement
        speedup = json.loads(cache.read_text()).popitem()[1]["speedup"]
        assert plan.bf16 == (speedup >= MIN_SPEEDUP) and f"{speedup:.2f}x" in plan.precision
