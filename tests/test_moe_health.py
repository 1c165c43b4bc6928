"""MoE health against independent references: a forced collapse counted with numpy, the router z-loss against its
closed form and gradcheck, and a zero coefficient that changes nothing."""

import numpy as np
import torch

from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import MoE, router_z_loss
from gpt_moe.train.moe_health import CollapseWatch, layer_health


def collapsed_moe(config, favoured=(3, 11)) -> MoE:
    """A MoE block whose balancing bias sends every token to the experts `favoured` (top-2)."""
    moe = MoE(config.replace(n_group=1, topk_group=1)).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[list(favoured)] = 100.0
    return moe


def numpy_entropy(x: np.ndarray, weight: np.ndarray) -> float:
    """Mean over tokens of the entropy of the normalised sigmoid scores, over log E."""
    scores = 1 / (1 + np.exp(-(x @ weight.T)))
    p = scores / scores.sum(axis=1, keepdims=True)
    return float((-(p * np.log(p)).sum(axis=1) / np.log(weight.shape[0])).mean())


def test_a_forced_collapse_gives_numpys_dead_count_and_entropy_and_one_warning(small_config):
    moe = collapsed_moe(small_config)
    n = small_config.n_routed_experts
    batches = [torch.randn(2, 7, small_config.hidden_size, dtype=torch.float32) for _ in range(3)]
    with torch.no_grad():
        for x in batches:
            moe(x)
    load = moe.load_since_update.clone()
    health = layer_health(load, moe.routing_since_log, moe.gate.e_score_correction_bias,
                          torch.zeros(n))
    tokens = np.concatenate([x.reshape(-1, small_config.hidden_size).numpy() for x in batches]).astype(np.float64)
    expected_load = np.zeros(n)
    expected_load[[3, 11]] = len(tokens)  # every token chose both favoured experts
    assert np.array_equal(load.numpy(), expected_load)
    assert health["dead"] == n - 2 and health["min_over_mean"] == 0.0
    assert abs(health["entropy"] - numpy_entropy(tokens, moe.gate.weight.detach().double().numpy())) < 1e-6
    assert health["bias_drift"] == 200.0 / n
    assert moe.routing_since_log[1] == len(tokens)

    watch = CollapseWatch(windows=3)
    said = [watch.update(layer=2, dead=int(health["dead"]), experts=n, step=s) for s in range(1, 6)]
    assert said[:2] == [None, None] and said[3:] == [None, None]  # once, at the third window in a row
    assert "MoE layer 2 has collapsed: 14 of its 16 routed experts" in said[2]
    assert watch.update(2, dead=0, experts=n, step=6) is None  # recovered
    assert [watch.update(2, dead=9, experts=n, step=s) for s in (7, 8, 9)][-1] is not None  # collapsed anew
    assert all(watch.update(4, dead=8, experts=n, step=s) is None for s in range(10))  # half is not more


def test_ep_skew_and_an_even_router():
    load = torch.tensor([4.0, 4.0, 4.0, 4.0])
    rows = torch.tensor([30.0, 10.0])
    health = layer_health(load, torch.tensor([8.0, 8.0]), torch.zeros(4), torch.zeros(4), rows)
    assert health["ep_skew"] == 1.5 and health["dead"] == 0 and health["min_over_mean"] == 1.0
    assert health["entropy"] == 1.0


def test_router_z_loss_is_its_closed_form_and_passes_gradcheck(small_config):
    logits = torch.randn(11, 16, dtype=torch.float64)
    closed = np.mean(np.log(np.exp(logits.numpy()).sum(axis=1)) ** 2)
    assert abs(router_z_loss(logits).item() - closed) < 1e-12
    assert torch.autograd.gradcheck(router_z_loss, (logits.clone().requires_grad_(),))

    config = small_config.replace(router_z_loss_coef=0.01, seq_aux_loss_coef=0.0)
    moe = collapsed_moe(config)
    x = torch.randn(2, 5, config.hidden_size)
    _, losses = moe(x)
    router_logits = x.reshape(-1, config.hidden_size).double().numpy() @ moe.gate.weight.detach().double().numpy().T
    expected = 0.01 * np.mean(np.log(np.exp(router_logits).sum(axis=1)) ** 2)
    assert abs(losses["z"].item() - expected) < 1e-6 * expected and "aux" not in losses
    losses["z"].backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def train(config, steps: int = 3, total: bool = True) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """`steps` AdamW steps on fixed random batches; backward of the model's loss (total) or of the loss rebuilt
    from its LM, MTP and balance parts. Returns the losses and the final weights."""
    model = DeepSeekForCausalLM(config, seed=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (2, 17), generator=generator)
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss if total else out.lm_loss + config.mtp_loss_weight * out.mtp_loss + out.aux_loss
        assert out.z_loss is None and out.aux_loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_zero_coefficient_computes_nothing_and_trains_bit_identically(small_config):
    """With router_z_loss_coef 0 (the default) the loss is exactly LM + weighted MTP + balance loss (the tiny
    preset's): training on it is bit-identical to training on those parts alone; when on, the z-loss adds."""
    config = small_config.replace(router_z_loss_coef=0.0)
    losses, weights = train(config)
    ref_losses, ref_weights = train(config, total=False)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)

    model = DeepSeekForCausalLM(config.replace(router_z_loss_coef=1e-2), seed=1).train()
    ids = torch.randint(0, config.vocab_size, (2, 17))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.z_loss > 0 and torch.equal(out.loss, out.lm_loss + config.mtp_loss_weight * out.mtp_loss
                                          + out.aux_loss + out.z_loss)
