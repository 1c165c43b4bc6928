"""Incremental decoding with the latent cache equals the full forward."""

import pytest
import torch

from gpt_moe.model.model import DeepSeekForCausalLM


@pytest.mark.parametrize("kind", ["latent", "expanded"])
def test_cached_decode_matches_full_forward(small_config, kind):
    model = DeepSeekForCausalLM(small_config, seed=2).eval()
    tokens = torch.randint(0, small_config.vocab_size, (2, 45))
    with torch.no_grad():
        full = model(tokens).logits
        caches = model.new_cache(batch=2, capacity=64, kind=kind)
        pieces = [model.decode_step(tokens[:, :8], caches)[0]]  # prefill 8, then 37 single steps
        pieces += [model.decode_step(tokens[:, t:t + 1], caches)[0] for t in range(8, 45)]
    assert caches[0].length == 45
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5
    with torch.no_grad():  # a prefill that computes the head at its last positions only
        last, hidden = model.decode_step(tokens, model.new_cache(batch=2, capacity=64, kind=kind), last_logits=3)
    assert last.shape == (2, 3, small_config.vocab_size) and hidden.shape[1] == 45
    assert (last - full[:, -3:]).abs().max().item() <= 1e-5


def test_cache_holds_only_latent_and_rope_key(small_config):
    model = DeepSeekForCausalLM(small_config, seed=2)
    caches = model.new_cache(batch=1, capacity=10)
    assert len(caches) == small_config.num_hidden_layers
    per_token = sum(c.entries[0, 0].numel() for c in caches)
    assert all(c.latent.shape[-1] == small_config.kv_lora_rank for c in caches)
    assert per_token == small_config.num_hidden_layers * (small_config.kv_lora_rank + small_config.qk_rope_head_dim)


def test_left_padded_batch_decodes_like_each_row_alone(small_config):
    """Row 0 is shorter and left-padded; masking the pad slots and shifting positions
    must give the logits the row gets alone."""
    model = DeepSeekForCausalLM(small_config, seed=3).eval()
    long = torch.randint(0, small_config.vocab_size, (1, 12))
    short = torch.randint(0, small_config.vocab_size, (1, 7))
    pad = 12 - 7
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[0, :pad] = False
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, _ = model.decode_step(batch, model.new_cache(2, 12), positions=positions, key_mask=key_mask)
        alone = model(short).logits
    assert (logits[0, pad:] - alone[0]).abs().max().item() <= 1e-5
    assert (logits[1] - model(long).logits[0]).abs().max().item() <= 1e-5
