"""A tiny exported checkpoint (untrained weights, a small trained BPE) for the chat, sampler and app tests.

Built without DeepSpeed in about a second: the `tiny` preset shrunk, its vocabulary equal to the
tokenizer's, written by `gpt_moe.export.export` with made-up training facts. Its replies are
gibberish; the tests check structure, not content. Import the fixture into a test module with
`from fixtures_checkpoint import tiny_checkpoint  # noqa: F401`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt_moe.checkpoint import LoadedModel
from gpt_moe.config import ModelConfig
from gpt_moe.export import export
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.tokenizer import save_tokenizer, train_bpe

TRAINING_FACTS = {"step": 42, "tokens_seen": 172032, "val_loss": 5.4321}
CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20
          + "def add(a, b):\n    return a + b\n" * 20
          + "Experts route tokens; the router picks two of sixteen. Ünïcödé and emoji 🙂 too. " * 20)


def tiny_config(vocab_size: int) -> ModelConfig:
    """3 layers (the first dense), 16 routed experts top-2 in 4 groups, MLA and MTP kept."""
    return ModelConfig.from_preset("tiny").replace(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
        intermediate_size=128, max_position_embeddings=512)


def make_tiny_export(out_dir: Path, seed: int = 3) -> Path:
    """Writes an exported-format checkpoint to `out_dir` (must not exist or be empty)."""
    source = out_dir.parent / f".{out_dir.name}.source"
    source.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    info = save_tokenizer(tokenizer, source)
    model = DeepSeekForCausalLM(tiny_config(tokenizer.n_vocab), seed=seed).eval()
    return export(LoadedModel(model, tokenizer, info, source, dict(TRAINING_FACTS)), out_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("chat") / "tiny_export")
