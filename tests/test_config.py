"""ModelConfig: presets load, and each class of bad input gets a one-line error naming key and value."""

import json

import pytest

from gpt_moe.errors import ConfigError
from gpt_moe.model.config import ModelConfig, from_hf_config, list_presets, to_hf_config


def test_all_presets_load_and_round_trip_through_json(tmp_path):
    assert {"tiny", "small", "medium", "deepseek-v2-lite", "deepseek-v3"} <= set(list_presets())
    for name in list_presets():
        config = ModelConfig.from_preset(name)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config.to_dict()))
        assert ModelConfig.load(str(path)) == config


def test_tiny_preset_keeps_every_feature():
    c = ModelConfig.from_preset("tiny")
    assert c.q_lora_rank > 0 and c.kv_lora_rank > 0
    assert c.n_routed_experts >= 8 and c.n_shared_experts >= 1
    assert c.first_k_dense_replace >= 1 and c.num_nextn_predict_layers == 1


def test_hf_config_round_trip():
    for name in ("tiny", "deepseek-v3"):
        c = ModelConfig.from_preset(name)
        back = from_hf_config(to_hf_config(c), name=c.name)
        for key in ("hidden_size", "q_lora_rank", "rope_scaling", "rope_theta", "n_group", "norm_topk_prob"):
            assert getattr(back, key) == getattr(c, key), key


def error_of(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_preset("tiny").replace(**changes)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("changes, expected", [
    (dict(num_experts_per_tok=17), "num_experts_per_tok=17 is invalid; expected between 1 and n_routed_experts=16"),
    (dict(n_group=3), "n_group=3 is invalid; expected a divisor of n_routed_experts=16"),
    (dict(topk_group=5), "topk_group=5 is invalid; expected at most n_group=4"),
    (dict(num_experts_per_tok=9),
     "num_experts_per_tok=9 is invalid; expected at most topk_group * experts per group = 8"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim=15 is invalid; expected a positive even integer"),
    (dict(hidden_size=0), "hidden_size=0 is invalid; expected a positive integer"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9 is invalid; expected at most num_hidden_layers=4"),
    (dict(scoring_func="relu"), "scoring_func='relu' is invalid; expected 'sigmoid' or 'softmax'"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers=2 is invalid; expected 0 (off) or 1"),
    (dict(hidden_size="256"), "hidden_size='256' is invalid; expected an integer"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings='yes' is invalid; expected true or false"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling.original_max_position_embeddings is missing"),
    (dict(rope_scaling={"type": "linear", "factor": 4}), "rope_scaling.type='linear' is invalid; expected 'yarn'"),
    (dict(rope_scaling={"factor": 0.5, "original_max_position_embeddings": 64}), "rope_scaling.factor=0.5 is invalid"),
])
def test_impossible_values_are_named(changes, expected):
    assert expected in error_of(**changes)


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"hidden_size": 64, "num_experts": 8}))
    with pytest.raises(ConfigError, match=r"model.json: unknown key 'num_experts'; allowed keys: "):
        ModelConfig.load(str(path))


def test_bad_json_and_missing_file_and_unknown_preset(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"hidden_size\": 64,")
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON"):
        ModelConfig.load(str(path))
    with pytest.raises(ConfigError, match=r"nope.json: model config file not found"):
        ModelConfig.load(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'; available presets: .*tiny"):
        ModelConfig.load("huge")
