"""Activation checkpointing: the same losses, gradients and balancing counts as keeping every activation; the
recomputation replays the first pass's routing and counts nothing twice."""

import pytest
import torch

from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import TopkRouter


def step(config, mode: str, between=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """One forward and backward of a fresh model (same weights every time) with checkpointing `mode`; between(model)
    runs after the forward, before the backward. Returns (loss, gradients by name, each MoE layer's counts)."""
    model = DeepSeekForCausalLM(config, seed=3).train()
    model.set_activation_checkpointing(mode)
    generator = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, config.vocab_size, (2, 24), generator=generator) for _ in range(2))
    out = model(ids, labels=labels)
    if between is not None:
        between(model)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, [moe.load_since_update.clone() for _, moe in model.moe_layers()]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_loss_gradients_and_counts(small_config, mode):
    """A MoE model with MTP and both router losses, fp32: within 1e-6 of the run without checkpointing."""
    config = small_config.replace(router_z_loss_coef=1e-3)
    assert config.num_nextn_predict_layers == 1 and config.seq_aux_loss_coef > 0
    loss, grads, counts = step(config, "none")
    loss_ck, grads_ck, counts_ck = step(config, mode)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=1e-6)
    assert grads_ck.keys() == grads.keys() and len(grads) == len(list(DeepSeekForCausalLM(config).parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ck[name], grad, rtol=0, atol=1e-6, msg=name)
    for got, expected in zip(counts_ck, counts, strict=True):
        assert torch.equal(got, expected)  # recomputation adds nothing to the bias-update counts


def test_full_recomputation_replays_the_saved_routing(small_config):
    """The biases move between forward and backward (as they would if anything changed them): a recomputation that
    routed again would choose other experts and give other gradients. Full checkpointing replays the first pass's
    choice, so the gradients are those of the run without checkpointing, and the router ran twice per MoE layer."""
    calls = []

    def shift_biases(model):
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias += torch.linspace(-5, 5, moe.gate.e_score_correction_bias.numel())

    def record(module, args, output):
        calls.append(output[0].clone())

    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: record(m, a, o) if isinstance(m, TopkRouter) else None)
    try:
        _, grads, _ = step(small_config, "none", shift_biases)
        layers = len(calls)
        calls.clear()
        _, grads_full, _ = step(small_config, "full", shift_biases)
    finally:
        hook.remove()
    assert len(calls) == 2 * layers  # each MoE layer routed once and recomputed once
    first, recomputed = calls[:layers], calls[layers:]
    assert sorted(map(lambda t: t.tolist(), first)) == sorted(map(lambda t: t.tolist(), recomputed))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_full[name], grad, rtol=0, atol=1e-6, msg=name)


def test_unknown_mode_is_refused(small_config):
    with pytest.raises(ValueError, match="'partial'"):
        DeepSeekForCausalLM(small_config).set_activation_checkpointing("partial")
