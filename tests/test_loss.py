"""The fused head + cross-entropy against the unfused reference: F.cross_entropy on full logits,
with autograd's gradients, and the loss transformers computes for the same weights."""

import pytest
import torch
import torch.nn.functional as F

from gpt_moe.model.loss import IGNORE_INDEX, linear_cross_entropy
from gpt_moe.model.model import DeepSeekForCausalLM


def reference(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("vocab, hidden_size, tokens", [(256, 32, 100), (300, 64, 7), (64, 128, 33), (96, 16, 1300)])
def test_loss_and_gradients_equal_the_unfused_reference_in_fp32(vocab, hidden_size, tokens):
    """2 x tokens rows: one chunk, or (last case) two chunks of MIN_CHUNK_TOKENS and a remainder."""
    hidden = torch.randn(2, tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens))
    labels[0, ::3] = IGNORE_INDEX
    fused = linear_cross_entropy(hidden, weight, labels)
    (fused * 1.7).backward()  # a non-unit upstream gradient
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = reference(hidden, weight, labels)
    (expected * 1.7).backward()
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_bf16_gradients_stay_close_to_fp32():
    hidden = torch.randn(300, 64)
    weight = torch.randn(512, 64) * 0.1
    labels = torch.randint(0, 512, (300,))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.to(dtype).detach().requires_grad_(), weight.to(dtype).detach().requires_grad_()
        linear_cross_entropy(h, w, labels).backward()
        assert h.grad.dtype == w.grad.dtype == dtype
        grads[dtype] = h.grad.float(), w.grad.float()
    for ours, exact in zip(grads[torch.bfloat16], grads[torch.float32]):
        assert (ours - exact).abs().max() <= 0.02 * exact.abs().max()


def test_no_gradient_work_without_autograd_and_all_ignored_is_nan():
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(16, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, torch.randint(0, 16, (5,)))
    assert loss.grad_fn is None and torch.isfinite(loss)
    assert torch.isnan(linear_cross_entropy(hidden, weight, torch.full((5,), IGNORE_INDEX)))


def test_model_losses_equal_cross_entropy_of_its_logits_and_transformers_loss(small_config):
    import transformers

    from gpt_moe.model.config import to_hf_config

    config = small_config.replace(seq_aux_loss_coef=0.0)
    model = DeepSeekForCausalLM(config, seed=3).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    labels = tokens[:, 1:].clone()
    labels[1, -5:] = IGNORE_INDEX
    inputs = tokens[:, :-1]
    with torch.no_grad():
        out = model(inputs, labels=labels)
        logits = model(inputs).logits
    assert out.logits is None
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten()), rtol=1e-6,
                               atol=1e-6)
    assert out.loss == pytest.approx((out.lm_loss + config.mtp_loss_weight * out.mtp_loss).item(), rel=1e-6)

    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**to_hf_config(config))).eval()
    mtp = f"model.layers.{config.num_hidden_layers}."
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(mtp)}, strict=False)
    hf_labels = torch.cat((inputs[:, :1], labels), dim=1)  # transformers shifts the labels itself
    with torch.no_grad():
        their_loss = hf(inputs, labels=hf_labels[:, :-1]).loss
    # their labels: position t predicts hf_labels[t+1] = labels[t] for t < seq-1; the last label is dropped
    with torch.no_grad():
        ours_same_positions = model(inputs[:, :-1], labels=labels[:, :-1]).lm_loss
    torch.testing.assert_close(their_loss, ours_same_positions, rtol=1e-5, atol=1e-5)
