"""DeepSpeed JSON handling: shipped configs resolve, typos are rejected, conflicts are listed together."""

import json
from pathlib import Path

import pytest

from gpt_moe.errors import ConfigError
from gpt_moe.train.config import TrainConfig, lr_at
from gpt_moe.train.ds_config import TrainingShape, load_ds_config, resolve_ds_config

DS_CONFIGS = sorted((Path(__file__).parent.parent / "ds_configs").glob("*.json"))


def shape(**changes):
    values = dict(micro_batch=4, grad_accum=2, data_parallel_size=2, lr=1e-3, weight_decay=0.1, clip=1.0,
                  bf16_supported=True, hidden_size=64)
    values.update(changes)
    return TrainingShape(**values)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve_completely(path):
    resolved, _ = resolve_ds_config(load_ds_config(path), shape())
    text = json.dumps(resolved)
    assert '"auto"' not in text
    assert resolved["train_batch_size"] == 4 * 2 * 2
    assert resolved["optimizer"]["params"]["lr"] == 1e-3
    assert resolved["bf16"]["enabled"] is True
    assert resolved["gradient_clipping"] == 1.0


def test_expected_shipped_set():
    assert {p.name for p in DS_CONFIGS} == {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json"}


def test_unknown_top_level_key_is_rejected(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "gradient_clip": 1.0}))
    with pytest.raises(ConfigError, match=r"typo.json: unknown top-level key 'gradient_clip'"):
        load_ds_config(path)


def test_all_conflicts_in_one_error():
    raw = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 99,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.5}}, "zero_optimization": {"foo": "auto"}}
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(raw, shape(explicit=frozenset({"--micro-batch", "--lr"})))
    message = str(info.value)
    assert "\n" not in message
    assert "train_micro_batch_size_per_gpu=8 but --micro-batch 4" in message
    assert "optimizer.params.lr=0.5 but --lr 0.001" in message
    assert "train_batch_size=99" in message
    assert 'cannot resolve "auto" at zero_optimization.foo' in message


def test_concrete_json_value_wins_over_default_flag():
    resolved, s = resolve_ds_config({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.3}, shape())
    assert s.micro_batch == 8 and s.clip == 0.3
    assert resolved["train_batch_size"] == 8 * 2 * 2


def test_bf16_forced_on_unsupported_device_is_a_conflict():
    with pytest.raises(ConfigError, match="bf16.enabled=true but this device does not support bf16"):
        resolve_ds_config({"bf16": {"enabled": True}}, shape(bf16_supported=False))
    assert resolve_ds_config({"bf16": {"enabled": "auto"}}, shape(bf16_supported=False))[0]["bf16"]["enabled"] is False


def test_bf16_auto_means_native_and_forcing_emulated_bf16_warns(caplog):
    emulated = shape(bf16_supported=True, bf16_native=False)  # e.g. an AVX2-only CPU
    assert resolve_ds_config({"bf16": {"enabled": "auto"}}, emulated)[0]["bf16"]["enabled"] is False
    assert resolve_ds_config({"bf16": {"enabled": "auto"}}, shape(bf16_native=True))[0]["bf16"]["enabled"] is True
    with caplog.at_level("WARNING", logger="gpt_moe.train.ds_config"):
        assert resolve_ds_config({"bf16": {"enabled": True}}, emulated)[0]["bf16"]["enabled"] is True
    assert "emulated" in caplog.text


def test_lr_schedules():
    cosine = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cosine) == pytest.approx(0.1)
    assert lr_at(9, cosine) == pytest.approx(1.0)
    assert lr_at(60, cosine) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(110, cosine) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5)
    assert lr_at(100, wsd) == pytest.approx(0.0)
