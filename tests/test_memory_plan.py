"""The memory estimate: activations against what autograd really keeps, model states against closed-form counts,
sizes on the command line, and the largest micro-batch that fits."""

import pytest
import torch

from gpt_moe.checkpoint.records import Layout
from gpt_moe.errors import ConfigError
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.train.memory_plan import GIB, MemoryLayout, activation_bytes, largest_micro_batch, training_memory
from gpt_moe.train.plan import parse_memory


def saved_bytes(model: DeepSeekForCausalLM, ids: torch.Tensor) -> int:
    """What autograd keeps for backward at the end of the forward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).loss.backward()
    return sum(kept.values())


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_activation_estimate_matches_what_autograd_keeps(mode):
    """tiny, fp32, 4 x 256 tokens: the closed form within 10% of the saved tensors (the head's chunk excluded)."""
    config = ModelConfig.load("tiny")
    model = DeepSeekForCausalLM(config, seed=0).train()
    model.set_activation_checkpointing(mode)
    ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids)
    assert activation_bytes(config, 4 * 256, mode, 4) == pytest.approx(measured, rel=0.10)


def test_model_states_shrink_with_each_zero_stage_and_checkpointing_shrinks_activations():
    config = ModelConfig.load("small")
    params = 888_969_856  # with MTP (gpt_moe.model.params.account)
    layouts = {stage: MemoryLayout(Layout(2, 1, stage, False), 32, 1) for stage in (0, 1, 2, 3)}
    states = {stage: sum(v for k, v in training_memory(config, layout).parts.items()
                         if k in ("weights", "grads", "optimizer")) * GIB for stage, layout in layouts.items()}
    assert states[0] == pytest.approx(params * (4 + 4 + 12))  # fp32 weights, grads, master + Adam
    assert states[1] == pytest.approx(params * (4 + 4 + 12 / 2))
    assert states[2] == pytest.approx(params * (4 + 12 / 2 + 4 / 2))
    assert states[3] == pytest.approx(params * (4 + 4 + 8) / 2)  # the master shares the parameters
    acts = {mode: training_memory(config, MemoryLayout(Layout(2, 1, 3, False), 1024, 8, checkpointing=mode))
            .parts["activations"]
            for mode in ("none", "full", "selective")}
    assert acts["full"] < acts["selective"] < acts["none"]


def test_largest_micro_batch_is_the_last_that_fits():
    config = ModelConfig.load("tiny")
    layout = MemoryLayout(Layout(2, 1, 2, False), 256, 1, checkpointing="full")
    budget = training_memory(config, MemoryLayout(Layout(2, 1, 2, False), 256, 37, checkpointing="full")).total_gib
    budget += 1e-9
    assert largest_micro_batch(config, layout, budget) == 37
    assert largest_micro_batch(config, layout, 0.1) == 0


@pytest.mark.parametrize("text, gib", [("80GB", 80e9 / 2 ** 30), ("24GiB", 24.0), ("512MiB", 0.5), ("1.5 GiB", 1.5)])
def test_memory_sizes(text, gib):
    assert parse_memory(text) == pytest.approx(gib)


@pytest.mark.parametrize("text", ["80", "GB", "-1GB", "lots"])
def test_bad_memory_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match="--memory-per-rank"):
        parse_memory(text)
