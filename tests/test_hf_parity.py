"""Same weights, same logits: our model against transformers' DeepseekV3ForCausalLM (fp32)."""

import pytest
import torch
import transformers

from gpt_moe.model.config import from_hf_config, to_hf_config
from gpt_moe.model.model import DeepSeekForCausalLM


def hf_model(config):
    hf_config = transformers.DeepseekV3Config(**to_hf_config(config))
    return transformers.DeepseekV3ForCausalLM(hf_config).eval()


def ours_state_for_hf(model):
    """Our state dict minus the MTP block, which transformers does not implement."""
    mtp_prefix = f"model.layers.{model.config.num_hidden_layers}."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(mtp_prefix)}


VARIANTS = {
    "q_lora": {},
    "full_q_proj": {"q_lora_rank": 0},
    "no_groups": {"n_group": 1, "topk_group": 1},
    "groups_2_of_4_top3": {"num_experts_per_tok": 3},
    "half_split_rope": {"rope_interleave": False},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.7}},
    "unnormalised_scaled_weights": {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
    "tied_two_shared": {"tie_word_embeddings": True, "n_shared_experts": 2},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_weights_in_transformers_give_our_logits(small_config, variant):
    config = small_config.replace(**VARIANTS[variant])
    ours = DeepSeekForCausalLM(config, seed=1).eval()
    for _, moe in ours.moe_layers():  # a non-zero bias, large enough to change choices
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    theirs = hf_model(config)
    missing, unexpected = theirs.load_state_dict(ours_state_for_hf(ours), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        ours_logits, their_logits = ours(tokens).logits, theirs(tokens).logits
    assert (ours_logits - their_logits).abs().max().item() <= 1e-4


def test_their_random_init_in_our_model_gives_their_logits(small_config):
    theirs = hf_model(small_config)
    for name, buffer in theirs.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0, 0.1)
    config = from_hf_config(theirs.config.to_dict()).replace(num_nextn_predict_layers=0)
    ours = DeepSeekForCausalLM(config, seed=None).eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected)
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (ours(tokens).logits - theirs(tokens).logits).abs().max().item() <= 1e-4
