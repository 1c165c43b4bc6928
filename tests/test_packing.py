"""Packed fine-tuning rows: conversations share a row without seeing each other."""

import torch

from gpt_moe.model.model import DeepSeekForCausalLM, packed_causal_mask


def test_mask_is_causal_within_each_segment_only():
    segments = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = packed_causal_mask(segments)[0, 0]
    expected = torch.tensor([[s <= t and segments[0, s] == segments[0, t] for s in range(6)] for t in range(6)])
    assert torch.equal(mask, expected)


def test_a_conversation_packed_after_another_gives_its_logits_alone(small_config):
    model = DeepSeekForCausalLM(small_config, seed=5).eval()
    a = torch.randint(0, small_config.vocab_size, (1, 7))
    b = torch.randint(0, small_config.vocab_size, (1, 9))
    pad = torch.zeros(1, 3, dtype=torch.long)
    row = torch.cat((a, b, pad), dim=1)
    positions = torch.cat((torch.arange(7), torch.arange(9), torch.arange(3)))[None]
    segments = torch.tensor([[0] * 7 + [1] * 9 + [2] * 3])
    with torch.no_grad():
        alone = model(b).logits[0]
        packed = model(row, position_ids=positions, segment_ids=segments).logits[0, 7:16]
        leaking = model(row, position_ids=positions).logits[0, 7:16]  # positions restart, attention does not
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert (leaking - alone).abs().max() > 1e-3  # without the mask, B sees A: the check above can fail


def test_mtp_loss_of_a_packed_row_is_the_token_weighted_loss_of_its_conversations(small_config):
    """Losses over a packed row (labels -100 at each conversation's last position and on padding) equal the
    conversations' losses alone, weighted by their trained tokens: nothing leaks across the boundary,
    the multi-token-prediction block included."""
    model = DeepSeekForCausalLM(small_config.replace(seq_aux_loss_coef=0.0), seed=6).eval()
    convs = [torch.randint(0, small_config.vocab_size, (n,)) for n in (6, 10)]
    ids = torch.cat([*convs, torch.zeros(2, dtype=torch.long)])[None]
    labels = torch.cat([torch.cat((c[1:], torch.tensor([-100]))) for c in convs] + [torch.full((2,), -100)])[None]
    positions = torch.cat([torch.arange(6), torch.arange(10), torch.arange(2)])[None]
    segments = torch.tensor([[0] * 6 + [1] * 10 + [2] * 2])
    with torch.no_grad():
        packed = model(ids, labels=labels, position_ids=positions, segment_ids=segments)
        alone = [model(c[None, :-1], labels=c[None, 1:]) for c in convs]
    lm = sum(out.lm_loss * (len(c) - 1) for out, c in zip(alone, convs)) / sum(len(c) - 1 for c in convs)
    mtp = sum(out.mtp_loss * (len(c) - 2) for out, c in zip(alone, convs)) / sum(len(c) - 2 for c in convs)
    torch.testing.assert_close(packed.lm_loss, lm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.mtp_loss, mtp, rtol=1e-6, atol=1e-6)
