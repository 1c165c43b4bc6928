"""DeepSeekMoE against a naive per-token, per-expert loop; routing semantics; bias balancing."""

import pytest
import torch
import torch.nn.functional as F

from gpt_moe.model import moe as moe_module
from gpt_moe.model.moe import MoE, padded_places, update_bias


def naive_route(moe: MoE, x: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """One token x: [hidden] -> chosen expert ids and their mixing weights, by plain Python."""
    cfg = moe.config
    logits = [float(w @ x) for w in moe.gate.weight.detach().double()]
    if cfg.scoring_func == "sigmoid":
        scores = [1 / (1 + torch.exp(torch.tensor(-v)).item()) for v in logits]
    else:
        scores = torch.tensor(logits).softmax(0).tolist()
    bias = moe.gate.e_score_correction_bias.tolist()
    choice = [s + b for s, b in zip(scores, bias)]
    size = cfg.n_routed_experts // cfg.n_group
    groups = [sorted(choice[g * size:(g + 1) * size], reverse=True) for g in range(cfg.n_group)]
    group_score = [sum(g[:2]) if cfg.scoring_func == "sigmoid" else g[0] for g in groups]
    kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
    allowed = [e for e in range(cfg.n_routed_experts) if e // size in kept]
    chosen = sorted(allowed, key=lambda e: -choice[e])[: cfg.num_experts_per_tok]
    return chosen, scores


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, hidden] -> [tokens, hidden], one token and one expert at a time (differentiable)."""
    cfg = moe.config
    w_r = moe.gate.weight
    outputs = []
    for token in x:
        chosen, _ = naive_route(moe, token.detach().double())
        logits = w_r @ token
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(0)
        weights = torch.stack([scores[e] for e in chosen])
        if cfg.norm_topk_prob:
            weights = weights / weights.sum()
        weights = weights * cfg.routed_scaling_factor
        y = torch.zeros_like(token)
        for weight, e in zip(weights, chosen):
            gate_w, up_w = moe.experts.gate_up_proj[e].chunk(2, dim=0)
            hidden = F.silu(gate_w @ token) * (up_w @ token)
            y = y + weight * (moe.experts.down_proj[e] @ hidden)
        if cfg.n_shared_experts:
            y = y + moe.shared_experts(token)
        outputs.append(y)
    return torch.stack(outputs)


def make_moe(config, seed=0):
    torch.manual_seed(seed)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return moe


@pytest.mark.parametrize("changes", [
    {},  # sigmoid, 4 groups keep 2, top-2
    {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 4},
    {"scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.5},
    {"n_group": 8, "topk_group": 3, "num_experts_per_tok": 5, "n_shared_experts": 0},
])
@pytest.mark.parametrize("row_multiple", [1, 8])
def test_moe_equals_naive_loop_in_output_and_gradients(small_config, changes, row_multiple, monkeypatch):
    """Also with every expert's rows padded to a multiple of 8 (the bf16 CPU path's padding, here in fp32)."""
    monkeypatch.setattr(moe_module, "expert_row_multiple", lambda x: row_multiple)
    config = small_config.replace(**changes)
    moe = make_moe(config)
    x = torch.randn(2, 13, config.hidden_size, requires_grad=True)
    out, _ = moe(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = {name: p.grad.clone() for name, p in moe.named_parameters()}
    ours_x = x.grad.clone()

    moe.zero_grad()
    x.grad = None
    ref = naive_moe(moe, x.view(-1, config.hidden_size)).view_as(out)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_x, x.grad, atol=1e-5, rtol=1e-5)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_token_counts_of_last_forward(small_config):
    moe = make_moe(small_config)
    x = torch.randn(3, 10, small_config.hidden_size)
    with torch.no_grad():
        moe(x)
    expected = torch.zeros(small_config.n_routed_experts)
    for token in x.view(-1, small_config.hidden_size):
        for e in naive_route(moe, token.double())[0]:
            expected[e] += 1
    assert torch.equal(moe.tokens_per_expert, expected)
    assert moe.tokens_per_expert.sum() == 30 * small_config.num_experts_per_tok


def test_bias_changes_choice_but_not_mixing_weights(small_config):
    moe = make_moe(small_config.replace(n_group=1, topk_group=1))
    x = torch.randn(64, small_config.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        ids0, weights0, scores0, _ = moe.gate(x)
        moe.gate.e_score_correction_bias.normal_(0, 0.5)
        ids1, weights1, scores1, _ = moe.gate(x)
    assert not torch.equal(ids0.sort(dim=1).values, ids1.sort(dim=1).values)  # choices moved
    torch.testing.assert_close(scores0, scores1)  # scores do not see the bias
    # for each token, the weights of the chosen set are its unbiased scores, renormalised and scaled
    for ids, weights in ((ids0, weights0), (ids1, weights1)):
        picked = scores0.gather(1, ids)
        expected = picked / picked.sum(1, keepdim=True) * small_config.routed_scaling_factor
        torch.testing.assert_close(weights, expected)


def test_bias_update_moves_by_exactly_rate():
    from gpt_moe.model.config import ModelConfig
    moe = MoE(ModelConfig.from_preset("tiny"))
    bias = moe.gate.e_score_correction_bias
    bias.copy_(torch.linspace(-0.1, 0.1, bias.numel()))
    before = bias.clone()
    load = torch.full((bias.numel(),), 10.0)
    load[3], load[7] = 50.0, 0.0  # overloaded / underloaded; the rest stays near the mean
    mean = load.mean()
    update_bias(moe.gate, load, rate=0.001)
    rate = torch.tensor(0.001, dtype=torch.float32)
    assert bias[3] == before[3] - rate  # exactly one step, in the buffer's fp32
    assert bias[7] == before[7] + rate
    for i in range(bias.numel()):
        step = rate if load[i] < mean else -rate if load[i] > mean else 0.0
        assert bias[i] == before[i] + step
    assert bias.dtype == torch.float32


def test_sequence_balance_loss_closed_form(small_config):
    config = small_config.replace(seq_aux_loss_coef=0.01)
    moe = make_moe(config).train()
    x = torch.randn(2, 9, config.hidden_size)
    _, losses = moe(x)
    aux = losses["aux"]
    n, k = config.n_routed_experts, config.num_experts_per_tok
    total = 0.0
    for seq in x:
        f = torch.zeros(n)
        p = torch.zeros(n)
        for token in seq:
            chosen, scores = naive_route(moe, token.detach().double())
            for e in chosen:
                f[e] += n / (k * len(seq))
            p += torch.tensor(scores, dtype=torch.float32) / sum(scores) / len(seq)
        total += 0.01 * float((f * p).sum())
    assert aux.item() == pytest.approx(total / 2, rel=1e-5)


def test_padded_places_put_each_expert_block_at_a_multiple_boundary():
    counts = torch.tensor([3, 0, 8, 1, 9])
    places, padded = padded_places(counts, 4)
    assert padded.tolist() == [4, 0, 8, 4, 12]
    expected, start = [], 0  # the naive loop: each block starts where the padded blocks before it end
    for count, size in zip(counts.tolist(), padded.tolist()):
        expected += list(range(start, start + count))
        start += size
    assert places.tolist() == expected


def test_bf16_moe_on_cpu_pads_to_64_rows_and_matches_the_unpadded_layer(small_config, monkeypatch):
    """bf16 on CPU runs the padded grouped matmuls (`expert_row_multiple` 64): the output and every gradient of the
    unpadded bf16 layer (the same routing), to bf16's precision."""
    assert moe_module.expert_row_multiple(torch.zeros(1, dtype=torch.bfloat16)) == 64
    assert moe_module.expert_row_multiple(torch.zeros(1)) == 1
    moe = make_moe(small_config).to(torch.bfloat16)
    x = torch.randn(2, 37, small_config.hidden_size, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    results = []
    for padded in (True, False):
        if not padded:
            monkeypatch.setattr(moe_module, "expert_row_multiple", lambda x: 1)
        moe.zero_grad()
        inputs = x.clone().requires_grad_()
        out, _ = moe(inputs)
        out.backward(grad)
        results.append([out, inputs.grad, *(p.grad.clone() for p in moe.experts.parameters())])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours.float(), reference.float(), atol=2e-2, rtol=2e-2)
