"""Shared fixtures: small model configs that keep every architectural feature."""

import pytest
import torch

from gpt_moe.config import ModelConfig


@pytest.fixture
def small_config() -> ModelConfig:
    """The tiny preset shrunk further for fast fp32 unit tests (MLA, 16 experts in 4 groups, MTP)."""
    return ModelConfig.from_preset("tiny").replace(vocab_size=256, hidden_size=64, num_hidden_layers=3,
                                                   q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                                   qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                                                   intermediate_size=128)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
