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


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small prepared corpus (the built-in one, capped) shared by the training tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("data") / "builtin_small"
    subprocess.run([sys.executable, "-m", "data_prep", "--source", "builtin", "--tokenizer", "bpe:1024",
                    "--max-tokens", "600000", "--val-fraction", "0.1", "--out", str(out), "--no-progress"],
                   check=True, capture_output=True)
    return out
