"""Shared fixtures: a micro model config that keeps every architectural feature, a prepared corpus, a few-step
training run, and an exported checkpoint for the chat, sampler and app tests."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from launching import train

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.checkpoint.records import TrainingFacts
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.tokenizer import save_tokenizer, train_bpe
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM


def shrunk_tiny(**changes) -> ModelConfig:
    """The `tiny` preset at micro size for fast fp32 tests: 3 layers (the first dense), MLA with small ranks,
    16 routed experts top-2 in 4 groups, MTP kept; `changes` on top."""
    micro = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                 intermediate_size=128)
    return ModelConfig.from_preset("tiny").replace(**{**micro, **changes})


@pytest.fixture
def small_config() -> ModelConfig:
    return shrunk_tiny()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


SMALL_DATA_PREP = ("--source", "builtin", "--tokenizer", "bpe:1024", "--max-tokens", "600000", "--val-fraction", "0.1",
                   "--no-progress")
"""`python -m data_prep` options of `prepared_data` (add --out)."""


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small prepared corpus (the built-in one, capped) shared by the training tests."""
    out = tmp_path_factory.mktemp("data") / "builtin_small"
    subprocess.run([sys.executable, "-m", "data_prep", *SMALL_DATA_PREP, "--out", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="session")
def chat_data(prepared_data, tmp_path_factory) -> Path:
    """The built-in conversations in `prepared_data`'s tokenizer, none longer than 257 tokens."""
    out = tmp_path_factory.mktemp("chat") / "chat-builtin"
    subprocess.run([sys.executable, "-m", "data_prep", "--format", "chat", "--source", "builtin-chat",
                    "--tokenizer-from", str(prepared_data), "--max-seq-len", "257", "--out", str(out),
                    "--no-progress"], cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def base_run(prepared_data, fp32_zero2, tmp_path_factory) -> Path:
    """A pretrained `tiny` (4 fp32 ZeRO-2 steps on one rank on the small built-in corpus, checkpoint at step 4):
    the model the fine-tuning and lm-eval tests start from (tests that use it are marked multiprocess)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train("--deepspeed", str(fp32_zero2), "--data", str(prepared_data), "--run-dir", str(run_dir), "--max-steps", "4",
          "--seq-len", "64", "--micro-batch", "4", "--save-interval", "4", "--eval-interval", "1000",
          "--sample-tokens", "0", ranks=0)
    return run_dir


@dataclass(frozen=True)
class ReferenceRun:
    """A finished training run the tests compare others with: its arguments but --data and --run-dir, its run
    directory (summary.json, checkpoints/), what it printed."""

    args: tuple[str, ...]
    run_dir: Path
    stdout: str


@pytest.fixture(scope="session")
def two_ranks_one_node(prepared_data, fp32_zero2, tmp_path_factory) -> ReferenceRun:
    """The micro model trained 3 steps (fp32, seed fixed, a checkpoint at step 3) on `prepared_data` by
    `deepspeed --num_gpus 2` on one node: what runs on many nodes must equal (tests/test_many_nodes.py,
    tests/test_node_local_disks.py)."""
    root = tmp_path_factory.mktemp("two-ranks")
    model = root / "model.json"
    model.write_text(json.dumps(shrunk_tiny(vocab_size=TokenShards(prepared_data).n_vocab).to_dict()))
    args = ("--deepspeed", str(fp32_zero2), "--model", str(model), "--max-steps", "3", "--save-interval", "3",
            "--seq-len", "64", "--micro-batch", "4", "--grad-accum", "2", "--log-interval", "1", "--eval-interval",
            "1000", "--eval-batches", "2", "--sample-tokens", "0", "--warmup-steps", "2")
    run_dir = root / "run"
    stdout = train(*args, "--data", str(prepared_data), "--run-dir", str(run_dir), ranks=2).stdout
    return ReferenceRun(args, run_dir, stdout)


@pytest.fixture(scope="session")
def fp32_zero2(tmp_path_factory) -> Path:
    """The shipped ds_configs/zero2.json with bf16 off: training tests that compare numbers run in fp32 on any CPU."""
    shipped = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json").read_text())
    path = tmp_path_factory.mktemp("ds") / "zero2_fp32.json"
    path.write_text(json.dumps({**shipped, "bf16": {"enabled": False}}))
    return path


# ------------------------------------------------------------------------------ an exported checkpoint
TRAINING_FACTS = {"step": 42, "tokens_seen": 172032, "val_loss": 5.4321, "chat": True}
CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20
          + "def add(a, b):\n    return a + b\n" * 20
          + "Experts route tokens; the router picks two of sixteen. Ünïcödé and emoji 🙂 too. " * 20)


def make_tiny_export(out_dir: Path, seed: int = 3, **changes) -> Path:
    """An exported-format checkpoint in `out_dir` (absent or empty): untrained micro weights, a 300-token BPE
    trained on CORPUS, made-up training facts; `changes` to the model config. Built without DeepSpeed in about a
    second; its replies are gibberish, so the tests check structure, not content."""
    source = out_dir.parent / f".{out_dir.name}.source"
    source.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    info = save_tokenizer(tokenizer, source)
    config = shrunk_tiny(vocab_size=tokenizer.n_vocab, max_position_embeddings=512, **changes)
    model = DeepSeekForCausalLM(config, seed=seed).eval()
    loaded = LoadedModel(model, tokenizer, info, source, TrainingFacts.from_dict(TRAINING_FACTS))
    return export(loaded, out_dir, dtype=torch.float32)


def prepare_chat(tokenizer_from: Path, out: Path, pairs: list[tuple[str, str]], val_fraction: float) -> Path:
    """(user, assistant) pairs as one-turn conversations prepared by data_prep in the tokenizer of `tokenizer_from`
    into `out` (with the rows file beside it)."""
    rows = out.parent / f"{out.name}.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for user, reply in pairs))
    subprocess.run([sys.executable, "-m", "data_prep", "--format", "chat", "--source", str(rows), "--tokenizer-from",
                    str(tokenizer_from), "--val-fraction", str(val_fraction), "--out", str(out), "--no-progress"],
                   cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("chat") / "tiny_export")


@pytest.fixture(scope="session")
def training_facts() -> dict:
    """The training facts recorded in `tiny_checkpoint`."""
    return dict(TRAINING_FACTS)
