"""The `config.json` of a transformers DeepSeek-architecture directory, field by field, to and from our
`ModelConfig` fields: `model_type` "deepseek_v3" (DeepSeek-V3/R1, Moonlight, Kimi-K2-style configs) and
"deepseek_v2" (V2, V2-Lite, Coder-V2-Lite). Torch-free; `gpt_moe.model.config` wraps it as `from_hf_config` /
`to_hf_config`.

Every key of a config.json has one fate, and a key that is in none of these tables is refused, so that a field we
do not model is never dropped unnoticed:

* MAPPED_AS_IS: the same field of ours (`vocab_size`, `kv_lora_rank`, `routed_scaling_factor`, ...);
* mapped with a conversion (`q_lora_rank` null -> 0, the RoPE fields -> `rope_theta` / `rope_scaling`, V2's
  `topk_method` -> `n_group` / `topk_group`, `aux_loss_alpha` + `seq_aux` -> `seq_aux_loss_coef`, ...);
* REQUIRED: a value the model computes only one way (`hidden_act` "silu", `attention_bias` false, ...); another
  value is refused in one line naming the field and value;
* IGNORED: what describes the file, the tokenizer or inference-time options, not the function the weights compute
  (each with its reason).

docs/fine-tuning.md ("Fine-tune a published model") has the table in prose.
"""

from __future__ import annotations

from typing import Any

from gpt_moe.errors import ConfigError

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
ARCHITECTURE = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
LATENT_NORM_EPS = 1e-6
"""transformers' (and the releases') MLA normalises the query and KV latents with RMSNorm's default eps, whatever
`rms_norm_eps` says; ours uses `rms_norm_eps` for every norm, so only this value maps exactly."""

MAPPED_AS_IS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor", "first_k_dense_replace",
    "max_position_embeddings", "tie_word_embeddings", "initializer_range",
)
STATED = tuple(key for key in MAPPED_AS_IS if key not in ("tie_word_embeddings", "initializer_range")) + (
    "q_lora_rank",)
"""Fields a config.json must state: their defaults differ between transformers' classes and ours."""
CONVERTED = (
    "model_type", "q_lora_rank", "rms_norm_eps", "rope_parameters", "rope_scaling", "rope_theta", "rope_interleave",
    "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob", "aux_loss_alpha", "seq_aux",
    "num_nextn_predict_layers", "num_key_value_heads", "head_dim", "qk_head_dim", "quantization_config",
)
REQUIRED: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0, None),  # the models train without it; we implement none
    "moe_layer_freq": (1,),  # an MoE block in every layer from first_k_dense_replace on
    "pretraining_tp": (1, None),  # Llama's sliced matmuls; 1 is the plain product
    "is_encoder_decoder": (False,),
}
IGNORED = {
    "architectures": "the class transformers instantiates (model_type decides)",
    "auto_map": "the release's remote-code entry points",
    "transformers_version": "the library that wrote the file",
    "_name_or_path": "where the file came from",
    "torch_dtype": "the storage dtype: read from the tensors",
    "dtype": "the storage dtype: read from the tensors",
    "use_cache": "an inference option",
    "output_router_logits": "an inference output option",
    "output_hidden_states": "an inference output option",
    "output_attentions": "an inference output option",
    "return_dict": "an inference output option",
    "chunk_size_feed_forward": "transformers' memory option for feed-forwards (the same result)",
    "id2label": "for a classification head, which a causal LM has not",
    "label2id": "for a classification head, which a causal LM has not",
    "problem_type": "for a classification head, which a causal LM has not",
    "bos_token_id": "the tokenizer's (read with the tokenizer)",
    "eos_token_id": "the tokenizer's (read with the tokenizer)",
    "pad_token_id": "the tokenizer's (read with the tokenizer)",
    "ep_size": "the expert-parallel degree of the release's inference code (ours is --ep-size)",
}
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
FP8_BLOCK = [128, 128]
ORDER = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
         "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
         "topk_group", "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "rope_parameters",
         "rope_interleave", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "initializer_range",
         "hidden_act", "attention_bias")
"""The keys of an exported config.json in the order gpt-moe has always written them."""


def refuse(source: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{source}: {key}={value!r} is not supported; gpt-moe implements {expected}")


def from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Our `ModelConfig` fields for a deepseek_v3 / deepseek_v2 config.json (before ModelConfig's own validation)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; gpt-moe reads "
                          f"{' and '.join(MODEL_TYPES)} (transformers DeepseekV3/V2ForCausalLM directories)")
    known = set(MAPPED_AS_IS) | set(CONVERTED) | set(REQUIRED) | set(IGNORED)
    for key, value in hf.items():
        if key not in known:
            raise ConfigError(f"{source}: field {key}={value!r} is not modelled by gpt-moe (not a {model_type} field "
                              "gpt-moe knows, so it may change the model in a way gpt-moe does not implement)")
    for key in STATED + (("n_group", "topk_group") if model_type == "deepseek_v3" else ()):
        if key not in hf:
            raise ConfigError(f"{source}: lacks field {key}; a {model_type} config.json states it (transformers "
                              "would fill in a default of its own, which gpt-moe does not guess)")
    for key, allowed in REQUIRED.items():
        if key in hf and not any(hf[key] == a and isinstance(hf[key], bool) == isinstance(a, bool) for a in allowed):
            raise refuse(source, key, hf[key], " or ".join(repr(a) for a in allowed if a is not None))
    values = {key: hf[key] for key in MAPPED_AS_IS if key in hf}
    values["q_lora_rank"] = hf.get("q_lora_rank") or 0
    _check_heads(hf, source)
    values.update(_rope(hf, source))
    values.update(_routing_v3(hf, source) if model_type == "deepseek_v3" else _routing_v2(hf, source))
    values.update(_balance_loss(hf, source))
    eps = hf.get("rms_norm_eps", LATENT_NORM_EPS)
    if eps != LATENT_NORM_EPS:
        raise refuse(source, "rms_norm_eps", eps, f"{LATENT_NORM_EPS} (transformers normalises the MLA latents with "
                     "1e-6 whatever this field says; one eps for every norm maps exactly only there)")
    values["rms_norm_eps"] = eps
    fp8_block_size(hf, source)  # refuses a quantization we do not read
    return values


def _check_heads(hf: dict[str, Any], source: str) -> None:
    """MLA has one latent per token expanded per head: num_key_value_heads must be the head count (transformers
    writes head_dim = qk_rope_head_dim and qk_head_dim = nope + rope; both are derived)."""
    heads = hf.get("num_attention_heads")
    checks = {"num_key_value_heads": heads, "head_dim": hf.get("qk_rope_head_dim"),
              "qk_head_dim": (hf.get("qk_nope_head_dim") or 0) + (hf.get("qk_rope_head_dim") or 0)}
    for key, expected in checks.items():
        if hf.get(key) is not None and hf[key] != expected:
            raise refuse(source, key, hf[key], f"{key} = {expected} (derived from the other fields in MLA)")


def _rope(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling + rope_theta (the releases' format) -> rope_theta and
    rope_scaling (YaRN or none); rope_interleave (V3 only; V2 always rotates interleaved pairs)."""
    rope = dict(hf.get("rope_parameters") or {})
    if not rope and hf.get("rope_scaling"):
        rope = {"rope_type": hf["rope_scaling"].get("type", hf["rope_scaling"].get("rope_type")),
                **{k: v for k, v in hf["rope_scaling"].items() if k not in ("type", "rope_type")}}
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", "default")
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": None}
    interleave = hf.get("rope_interleave", True)
    if hf.get("model_type") == "deepseek_v2" and interleave is not True:
        raise refuse(source, "rope_interleave", interleave, "interleaved RoPE pairs for deepseek_v2 (its only form)")
    out["rope_interleave"] = interleave
    if rope_type == "default":
        if rope:
            raise refuse(source, f"rope_parameters.{next(iter(rope))}", next(iter(rope.values())),
                         "no extra RoPE parameter without YaRN")
        return out
    if rope_type != "yarn":
        raise refuse(source, "rope_parameters.rope_type", rope_type, "'default' and 'yarn'")
    for key, value in rope.items():
        if key == "truncate" and value is True:
            continue
        if key not in YARN_KEYS:
            raise refuse(source, f"rope_parameters.{key}", value, "YaRN with " + ", ".join(YARN_KEYS))
    if rope.get("mscale_all_dim") and rope.get("mscale") is None:
        raise refuse(source, "rope_parameters.mscale", None, "YaRN with mscale given wherever mscale_all_dim is")
    if rope.get("factor") is None:  # transformers' rule for a missing factor
        rope["factor"] = hf.get("max_position_embeddings", 0) / rope.get("original_max_position_embeddings", 1)
    out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rope.items() if k in YARN_KEYS and v is not None}}
    return out


def _routing_v3(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """DeepSeek-V3: sigmoid scores, selection on scores + e_score_correction_bias ("noaux_tc"), groups scored by
    their two best experts, the chosen scores renormalised when norm_topk_prob, times routed_scaling_factor;
    the multi-token-prediction layer (num_nextn_predict_layers, 0 or 1)."""
    for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key, expected) != expected:
            raise refuse(source, key, hf[key], f"{expected!r} for deepseek_v3 (transformers' DeepseekV3 routing)")
    return {"scoring_func": "sigmoid", "n_group": hf.get("n_group") or 1, "topk_group": hf.get("topk_group") or 1,
            "norm_topk_prob": hf.get("norm_topk_prob", True),
            "num_nextn_predict_layers": hf.get("num_nextn_predict_layers") or 0}


def _routing_v2(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """DeepSeek-V2: softmax scores, no bias (so no bias balancing: bias_update_rate 0, the bias stays zero);
    topk_method "greedy" (top-k over all experts; n_group / topk_group unused) or "group_limited_greedy" (the
    topk_group groups with the best single expert first); the chosen scores are not renormalised, only scaled by
    routed_scaling_factor (transformers' DeepseekV2 ignores norm_topk_prob, while the release's code renormalises
    instead of scaling when it is true: the two disagree, so only false maps)."""
    if hf.get("scoring_func", "softmax") != "softmax":
        raise refuse(source, "scoring_func", hf["scoring_func"], "'softmax' for deepseek_v2")
    if hf.get("norm_topk_prob", False) is not False:
        raise refuse(source, "norm_topk_prob", hf["norm_topk_prob"], "false for deepseek_v2 (transformers and the "
                     "release's code weight the chosen experts differently when it is true)")
    if hf.get("num_nextn_predict_layers"):
        raise refuse(source, "num_nextn_predict_layers", hf["num_nextn_predict_layers"], "no MTP layer in deepseek_v2")
    method = hf.get("topk_method", "greedy")
    if method == "greedy":
        groups = {"n_group": 1, "topk_group": 1}
    elif method == "group_limited_greedy":
        groups = {"n_group": hf.get("n_group") or 1, "topk_group": hf.get("topk_group") or 1}
    else:
        raise refuse(source, "topk_method", method, "'greedy' and 'group_limited_greedy' for deepseek_v2")
    return {"scoring_func": "softmax", "norm_topk_prob": False, "bias_update_rate": 0.0,
            "num_nextn_predict_layers": 0, **groups}


def _balance_loss(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """aux_loss_alpha with seq_aux true (the releases' setting) is the sequence-wise balance loss weight; the
    batch-wise loss of seq_aux false is not implemented."""
    alpha = hf.get("aux_loss_alpha")
    if alpha is None:
        return {}
    if not hf.get("seq_aux", True) and alpha:
        raise refuse(source, "seq_aux", hf["seq_aux"], "the sequence-wise balance loss (seq_aux true) only")
    return {"seq_aux_loss_coef": alpha}


def fp8_block_size(hf: dict[str, Any], source: str = "config.json") -> tuple[int, int] | None:
    """The [rows, columns] of a block of DeepSeek-V3's FP8 release (`quantization_config`: quant_method "fp8",
    e4m3, one `weight_scale_inv` per block), or None for unquantised weights. Any other quantization is refused.
    activation_scheme ("dynamic") is how the release's inference quantises activations: weights read back to the
    training dtype do not use it."""
    quant = hf.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise refuse(source, "quantization_config.quant_method", method, "'fp8' (DeepSeek-V3's block-scaled e4m3)")
    for key, value in quant.items():
        allowed = {"quant_method": ("fp8",), "fmt": ("e4m3",), "activation_scheme": ("dynamic", "static")}
        if key == "weight_block_size":
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
                raise refuse(source, "quantization_config.weight_block_size", value, "[rows, columns] blocks")
        elif key not in allowed or value not in allowed[key]:
            raise refuse(source, f"quantization_config.{key}", value, "e4m3 weights with block scales")
    rows, cols = quant.get("weight_block_size", FP8_BLOCK)
    return rows, cols


def to_hf(values: dict[str, Any]) -> dict[str, Any]:
    """The config.json transformers loads for our fields: deepseek_v3 for sigmoid routing, deepseek_v2 for
    softmax routing (transformers' V3 router is sigmoid-only, its V2 router softmax-only)."""
    model_type = "deepseek_v3" if values["scoring_func"] == "sigmoid" else "deepseek_v2"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": values["rope_theta"]}
    if values.get("rope_scaling"):
        rope = {"rope_type": "yarn", "rope_theta": values["rope_theta"],
                **{k: v for k, v in values["rope_scaling"].items() if k != "type"}}
    hf = {"architectures": [ARCHITECTURE[model_type]], "model_type": model_type}  # the order 0.1 wrote
    for key in ORDER:
        hf[key] = values.get(key)
    hf.update(num_key_value_heads=values["num_attention_heads"], q_lora_rank=values["q_lora_rank"] or None,
              rope_parameters=rope, hidden_act="silu", attention_bias=False)
    if model_type == "deepseek_v3":
        hf["num_nextn_predict_layers"] = values["num_nextn_predict_layers"]
        return hf
    del hf["rope_interleave"]
    problems = {"norm_topk_prob": (values["norm_topk_prob"], False), "rope_interleave": (values["rope_interleave"],
                                                                                           True)}
    for key, (value, needed) in problems.items():
        if value != needed:
            raise ConfigError(f"{key}={value!r} has no transformers deepseek_v2 equivalent (softmax routing exports "
                              f"as deepseek_v2, which needs {key}={needed})")
    hf.update(topk_method="group_limited_greedy" if values["n_group"] > 1 else "greedy", mlp_bias=False)
    return hf
