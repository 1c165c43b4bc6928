"""Random transformers DeepSeek directories for the tests, written the way people have them: transformers'
`save_pretrained` (one tensor per routed expert, as the releases store them), DeepSeek-V3's MTP layer added in the
release's layout, optionally quantised to the release's FP8 block format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt_moe.checkpoint import fp8

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
             max_position_embeddings=256)
V2_LITE_LIKE = dict(SHAPE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                    routed_scaling_factor=1.0, n_shared_experts=2)
V2_LIKE = dict(SHAPE, q_lora_rank=48, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               norm_topk_prob=False, routed_scaling_factor=16.0)
SMALL_LIKE = dict(vocab_size=1024, hidden_size=256, intermediate_size=768, moe_intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=64, n_shared_experts=1,
                  num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=256, q_lora_rank=None,
                  topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
"""A `small`-like deepseek_v2 (40M parameters, 94% of them in 3 x 64 routed experts): the expert bytes dominate."""
V3_LIKE = dict(SHAPE, q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
               num_nextn_predict_layers=1)


def transformers_model(model_type: str, seed: int = 0, **config):
    """A random DeepseekV3/V2ForCausalLM (fp32, eval) with every router bias non-zero (V3)."""
    import transformers

    torch.manual_seed(seed)
    classes = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
               "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}
    config_class, model_class = classes[model_type]
    model = model_class(config_class(**config)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)  # large enough to change which experts are chosen
        for name, param in model.named_parameters():  # std 0.02 everywhere would make the logits nearly flat
            if name.endswith(("gate.weight", "embed_tokens.weight", "lm_head.weight")):
                param.normal_(0, 0.5)
    return model


def mtp_tensors(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's MTP layer in the release's layout (model.layers.{N}: enorm, hnorm, eh_proj, shared_head.norm,
    shared_head.head, its own embed_tokens, and a whole decoder layer with one tensor per routed expert), random,
    with the embedding and head equal to the model's."""
    config = model.config
    n, h, inter = config.num_hidden_layers, config.hidden_size, config.moe_intermediate_size
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.05

    layer = {k.removeprefix(f"model.layers.{n - 1}."): v for k, v in model.state_dict().items()
             if k.startswith(f"model.layers.{n - 1}.")}  # a MoE layer's names and shapes
    out = {}
    for key, value in layer.items():
        if key.endswith("experts.gate_up_proj"):
            for e in range(value.shape[0]):
                out[f"mlp.experts.{e}.gate_proj.weight"] = rand(inter, h)
                out[f"mlp.experts.{e}.up_proj.weight"] = rand(inter, h)
        elif key.endswith("experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"mlp.experts.{e}.down_proj.weight"] = rand(h, inter)
        elif key.endswith("norm.weight"):
            out[key] = 1 + rand(*value.shape)
        else:
            out[key] = rand(*value.shape)
    out.update({"enorm.weight": 1 + rand(h), "hnorm.weight": 1 + rand(h), "eh_proj.weight": rand(h, 2 * h),
                "shared_head.norm.weight": 1 + rand(h),
                "shared_head.head.weight": model.state_dict()["lm_head.weight"].clone(),
                "embed_tokens.weight": model.state_dict()["model.embed_tokens.weight"].clone()})
    return {f"model.layers.{n}.{key}": value.contiguous() for key, value in out.items()}


def save_directory(model, directory: Path, extra: dict[str, torch.Tensor] | None = None,
                   fp8_block: tuple[int, int] | None = None) -> Path:
    """`model.save_pretrained(directory)`, then the `extra` tensors (an MTP layer) added to its safetensors and,
    with `fp8_block`, every 2-D weight but the embeddings, head, routers and norms quantised to FP8 e4m3 with one
    scale per block (`{name}_scale_inv`), and config.json's quantization_config as DeepSeek-V3's release has it."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    file = directory / "model.safetensors"
    state = {**load_file(file), **(extra or {})}
    if fp8_block is not None:
        for key in list(state):
            if state[key].dim() == 2 and not key.endswith(("embed_tokens.weight", "head.weight", "gate.weight")):
                state[key], state[key + "_scale_inv"] = fp8.quantize(state[key], fp8_block)
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(fp8_block)}
        (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file(state, file, metadata={"format": "pt"})
    return directory


def edit_config(directory: Path, **changes) -> None:
    """Changes (or, for a None value, removes) fields of the directory's config.json."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=1))


class ShareOfTheExperts:
    """Builds the routed experts rank `rank` of `ranks` holds under expert parallelism (the model calls only
    `build_experts` while it is built; nothing here runs experts): for loading a rank's share in one process."""

    def __init__(self, rank: int, ranks: int) -> None:
        self.rank, self.ranks = rank, ranks

    def build_experts(self, config):
        from gpt_moe.model.moe import Experts

        local = config.n_routed_experts // self.ranks
        return Experts(config, local, self.rank * local)


def load_share(directory: Path, rank: int, ranks: int):
    """(the model of rank `rank` of `ranks` with its experts read from `directory`, the reader's ReadStats)."""
    from gpt_moe.checkpoint.loading import load_weights, open_weights
    from gpt_moe.checkpoint.model_dir import ModelDirectory
    from gpt_moe.checkpoint.weights import check_weights
    from gpt_moe.model.model import DeepSeekForCausalLM

    base = ModelDirectory.open(directory)
    source = open_weights(base)
    check_weights(source, base.config)
    model = DeepSeekForCausalLM(base.config, ShareOfTheExperts(rank, ranks), seed=None)
    assert load_weights(model, source) is None
    return model, source.stats
