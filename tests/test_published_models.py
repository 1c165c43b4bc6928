"""The DeepSeek-architecture checkpoints people have: transformers directories of model_type deepseek_v2 (V2-Lite-
like: softmax routing, no query LoRA; V2-like: group-limited greedy, scaled weights) and deepseek_v3 (sigmoid with
bias, groups, query LoRA, one MTP layer), written with transformers in the test. Loaded through the `--init-from`
path (headers checked, then the weights read into a model one tensor at a time) they give transformers' logits; an
export goes back to the original model_type and transformers loads it with the same logits. Every config field is
mapped or refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hf_dirs import V2_LIKE, V2_LITE_LIKE, V3_LIKE, edit_config, mtp_tensors, save_directory, transformers_model

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import LoadedModel, load_model, load_weights, open_weights, read_weights
from gpt_moe.checkpoint.model_dir import ModelDirectory
from gpt_moe.checkpoint.records import TrainingFacts
from gpt_moe.checkpoint.weights import check_weights
from gpt_moe.data.tokenizer import save_tokenizer, train_bpe
from gpt_moe.errors import CheckpointError, ConfigError
from gpt_moe.model.config import from_hf_config
from gpt_moe.model.model import DeepSeekForCausalLM

KINDS = {"v2_lite_like": ("deepseek_v2", V2_LITE_LIKE), "v2_like": ("deepseek_v2", V2_LIKE),
         "v3_like": ("deepseek_v3", V3_LIKE)}


@pytest.fixture(scope="module", params=list(KINDS))
def published(request, tmp_path_factory):
    """(directory, the transformers model read back from it, the MTP tensors written or {})."""
    model_type, config = KINDS[request.param]
    model = transformers_model(model_type, **config)
    mtp = mtp_tensors(model) if config.get("num_nextn_predict_layers") else {}
    directory = save_directory(model, tmp_path_factory.mktemp(request.param) / "hf", extra=mtp)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return directory, theirs, mtp


def init_from_path(directory) -> DeepSeekForCausalLM:
    """What --init-from does on one rank: headers checked, an uninitialised model, every tensor read into it."""
    base = ModelDirectory.open(directory)
    source = open_weights(base)
    assert check_weights(source, base.config) == (base.config.num_nextn_predict_layers > 0)
    model = DeepSeekForCausalLM(base.config, seed=None)
    assert load_weights(model, source) is None
    return model.eval()


def test_our_logits_equal_transformers_after_loading(published):
    directory, theirs, mtp = published
    ours = init_from_path(directory)
    tokens = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        reference = theirs(tokens).logits
        assert (ours(tokens).logits - reference).abs().max().item() <= 1e-5
        assert (load_model(ModelDirectory.open(directory))(tokens).logits - reference).abs().max().item() <= 1e-5
    assert reference.std() > 0.1  # not a flat distribution that any model would match


@pytest.fixture(scope="module")
def v3_with_mtp(tmp_path_factory):
    """A deepseek_v3 directory with its MTP layer: (directory, the MTP tensors written)."""
    model = transformers_model("deepseek_v3", **V3_LIKE)
    mtp = mtp_tensors(model)
    return save_directory(model, tmp_path_factory.mktemp("v3_mtp") / "hf", extra=mtp), mtp


def test_the_mtp_layer_of_the_release_layout_is_our_mtp_block(v3_with_mtp):
    directory, mtp = v3_with_mtp
    ours = init_from_path(directory)
    state = ours.state_dict()
    n = ours.config.num_hidden_layers
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias", "mlp.shared_experts.up_proj.weight"):
        assert torch.equal(state[f"model.layers.{n}.{key}"], mtp[f"model.layers.{n}.{key}"]), key
    inter = ours.config.moe_intermediate_size
    stacked = state[f"model.layers.{n}.mlp.experts.gate_up_proj"]
    for e in range(ours.config.n_routed_experts):
        assert torch.equal(stacked[e, :inter], mtp[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(stacked[e, inter:], mtp[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"])
        assert torch.equal(state[f"model.layers.{n}.mlp.experts.down_proj"][e],
                           mtp[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"])
    assert read_weights(ModelDirectory.open(directory)).keys() == state.keys()


def test_export_goes_back_to_the_original_model_type_with_the_same_logits(published, tmp_path, caplog):
    directory, theirs, mtp = published
    ours = load_model(ModelDirectory.open(directory))
    tokenizer = train_bpe(["a tokenizer for the export only " * 30], vocab_size=300)
    info = save_tokenizer(tokenizer, tmp_path)
    out = export(LoadedModel(ours, tokenizer, info, tmp_path, TrainingFacts()), tmp_path / "export",
                 dtype=torch.float32)
    written = json.loads((out / "config.json").read_text())
    original = json.loads((directory / "config.json").read_text())
    assert written["model_type"] == original["model_type"]
    assert written["architectures"] == original["architectures"]
    caplog.set_level("WARNING")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(theirs)
    assert not [r for r in caplog.records if any(word in r.getMessage().lower() for word in
                                                 ("missing", "unexpected", "newly initialized"))]
    tokens = torch.randint(0, 320, (2, 33))
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-5
        assert (back(tokens).logits - theirs(tokens).logits).abs().max().item() <= 1e-5
    assert (out / "mtp.safetensors").is_file() == bool(mtp)
    again = from_hf_config(written, source="export")  # the mapping reads its own output back
    assert (again.scoring_func, again.n_group, again.topk_group) == (ours.config.scoring_func, ours.config.n_group,
                                                                     ours.config.topk_group)


def test_a_different_mtp_copy_of_the_embedding_is_refused(tmp_path):
    model = transformers_model("deepseek_v3", **V3_LIKE)
    mtp = mtp_tensors(model)
    mtp["model.layers.3.embed_tokens.weight"][5, 7] += 1.0
    directory = save_directory(model, tmp_path / "hf", extra=mtp)
    source = open_weights(ModelDirectory.open(directory))
    ours = DeepSeekForCausalLM(ModelDirectory.open(directory).config, seed=None)
    problem = load_weights(ours, source)
    assert problem and "model.layers.3.embed_tokens.weight differs from model.embed_tokens.weight" in problem


V3_CONFIG = {**V3_LIKE, "model_type": "deepseek_v3", "num_nextn_predict_layers": 1}


@pytest.mark.parametrize("changes, expected", [
    ({"model_type": "deepseek_v32"}, "model_type 'deepseek_v32' is not supported"),
    ({"sliding_window": 4096}, "field sliding_window=4096 is not modelled by gpt-moe"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported; gpt-moe implements 'sigmoid'"),
    ({"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
    ({"num_key_value_heads": 1}, "num_key_value_heads=1 is not supported"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05 is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_parameters.rope_type='llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4, "original_max_position_embeddings": 64,
                          "truncate": False}}, "rope_parameters.truncate=False"),
    ({"seq_aux": False, "aux_loss_alpha": 0.001}, "seq_aux=False is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method='gptq'"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config.fmt='e5m2'"),
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers=2 is invalid"),
    ({"kv_lora_rank": None}, "kv_lora_rank=None is invalid"),
    ({"routed_scaling_factor": None}, "routed_scaling_factor=None is invalid"),
    ({"n_group": None}, "lacks field n_group"),
])
def test_a_field_or_value_we_do_not_implement_is_refused_in_one_line(changes, expected):
    config = {k: v for k, v in {**V3_CONFIG, **changes}.items() if k not in changes or v is not None
              or k != "n_group"}
    with pytest.raises(ConfigError) as info:
        from_hf_config(config, source="config.json")
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("changes, expected", [
    ({"norm_topk_prob": True}, "norm_topk_prob=True is not supported"),
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc' is not supported"),
    ({"rope_interleave": False}, "rope_interleave=False is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
])
def test_deepseek_v2_values_we_do_not_implement_are_refused(changes, expected):
    config = {**V2_LIKE, "model_type": "deepseek_v2", **changes}
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        from_hf_config(config, source="config.json")


def test_the_releases_config_formats_map(tmp_path):
    """DeepSeek-V2-Lite's and DeepSeek-V3's published config.json (their fields and values as released: remote-code
    fields, rope_scaling instead of rope_parameters) map to the presets of their shapes."""
    from gpt_moe.model.config import ModelConfig

    v2_lite = {"architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
               "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
               "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
               "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
               "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
               "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
               "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
               "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
               "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
               "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
               "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
               "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
               "ep_size": 1}
    ours = from_hf_config(v2_lite, name="deepseek-v2-lite")
    preset = ModelConfig.from_preset("deepseek-v2-lite")
    assert {k: v for k, v in ours.to_dict().items() if k != "extra"} == {
        k: v for k, v in preset.to_dict().items() if k != "extra"}
    v3 = {**{k: v for k, v in v2_lite.items() if k not in ("scoring_func", "topk_method")},
          "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
          "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
          "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "n_routed_experts": 256,
          "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
          "routed_scaling_factor": 2.5, "norm_topk_prob": True, "num_nextn_predict_layers": 1, "topk_method":
          "noaux_tc", "scoring_func": "sigmoid", "vocab_size": 129280,
          "rope_scaling": {**v2_lite["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0},
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}}
    ours = from_hf_config(v3, name="deepseek-v3")
    preset = ModelConfig.from_preset("deepseek-v3")
    different = {k for k, v in preset.to_dict().items() if getattr(ours, k) != v} - {"extra"}
    assert different == {"seq_aux_loss_coef"}  # the release's 0.001; the preset follows the paper's 1e-4


def test_a_transformers_directory_with_an_unsupported_field_is_refused_when_opened(published, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(published[0], directory)
    edit_config(directory, hidden_act="relu")
    with pytest.raises(ConfigError, match=r"config.json: hidden_act='relu' is not supported"):
        ModelDirectory.open(directory)
    edit_config(directory, hidden_act="silu", model_type="llama")
    with pytest.raises(ConfigError, match=r"model_type 'llama' is not supported"):
        ModelDirectory.open(directory)


def test_their_weights_missing_a_tensor_or_in_another_shape_are_refused_from_the_headers(published, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "copy"
    import shutil

    shutil.copytree(published[0], directory)
    state = load_file(directory / "model.safetensors")
    state["model.layers.1.mlp.experts.3.up_proj.weight"] = state["model.layers.1.mlp.experts.3.up_proj.weight"][:5]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.experts.3.up_proj.weight is \\[5, 64\\]"):
        open_weights(ModelDirectory.open(directory))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="experts.\\*.up_proj holds experts"):
        open_weights(ModelDirectory.open(directory))


def test_a_rank_reads_only_its_experts_by_name_or_by_rows(published, tmp_path):
    """Two ranks' shares (expert parallelism 2) of the released per-expert names and of our export's stacked rows:
    each reads half the expert bytes and all the rest, and holds exactly the experts of the whole model's rows."""
    from hf_dirs import load_share

    directory, _, _ = published
    whole = load_model(ModelDirectory.open(directory))
    tokenizer = train_bpe(["a tokenizer for the export only " * 30], vocab_size=300)
    exported = export(LoadedModel(whole, tokenizer, save_tokenizer(tokenizer, tmp_path), tmp_path, TrainingFacts()),
                      tmp_path / "export", dtype=torch.float32)
    for source in (directory, exported):
        _, everything = load_share(source, 0, 1)
        for rank in (0, 1):
            share, stats = load_share(source, rank, 2)
            assert stats.expert_bytes * 2 == everything.expert_bytes > 0, source
            assert stats.bytes - stats.expert_bytes == everything.bytes - everything.expert_bytes
            for name, value in share.state_dict().items():
                rows = slice(rank * value.shape[0], (rank + 1) * value.shape[0]) if ".experts." in name else slice(None)
                assert torch.equal(value, whole.state_dict()[name][rows]), name
