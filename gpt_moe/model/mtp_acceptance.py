"""The MTP block's acceptance rate as a draft model, measured teacher-forced on given text.

At position t the MTP block (depth 1) reads the main model's hidden state h_t and the embedding of token
t+1 and predicts token t+2; the main model predicts the same token at position t+1. Greedy self-speculative
decoding (`gpt_moe.serve.generate.SelfSpeculativeDecoder`) accepts a draft exactly when the two top tokens agree,
so their agreement over validation data is the acceptance rate the decoder would see on that text. The
trainer logs it as `eval/mtp_acceptance`, for pretraining and fine-tuning alike: post-training can let the
head drift.
"""

from __future__ import annotations

import torch

from gpt_moe.errors import ConfigError
from gpt_moe.model.loss import IGNORE_INDEX
from gpt_moe.model.model import DeepSeekForCausalLM

ARGMAX_ROWS = 4096  # positions per output-head chunk: the [positions, vocab] logits are never all in memory


def top_tokens(model: DeepSeekForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [batch, seq, hidden] normalised -> [batch, seq] argmax of the output head, chunk by chunk."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    tops = [model.lm_head(chunk).argmax(dim=-1) for chunk in flat.split(ARGMAX_ROWS)]
    return torch.cat(tops).view(hidden.shape[:-1])


@torch.no_grad()
def mtp_agreement(model: DeepSeekForCausalLM, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Arguments as the model's forward (input_ids, labels, position_ids, segment_ids: [batch, seq]).

    Returns [2] int64: (positions where the MTP block's top token for t+2 equals the main model's,
    positions counted). A position t counts when its token after next is trained (labels[t+1] is not
    ignored) and, in packed rows, belongs to the same conversation."""
    mtp = model.model.mtp_layer
    if mtp is None:
        raise ConfigError("mtp acceptance: the model has no MTP block (num_nextn_predict_layers 0)")
    x, cos, sin, mask = model.embed(input_ids, position_ids, segment_ids)
    for layer in model.model.main_layers:
        x, _ = layer(x, cos, sin, attn_mask=mask)
    main_top = top_tokens(model, model.model.norm(x[:, 1:]))  # [batch, seq-1]: position t+1's guess at t+2
    mtp_hidden, _ = mtp.predict(x[:, :-1], model.model.embed_tokens(input_ids[:, 1:]), cos[..., :-1, :],
                                sin[..., :-1, :], mask[..., :-1, :-1] if mask is not None else None)
    mtp_top = top_tokens(model, mtp_hidden)  # [batch, seq-1]: position t's guess at t+2
    counted = labels[:, 1:] != IGNORE_INDEX
    if segment_ids is not None:
        counted &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return torch.stack((((mtp_top == main_top) & counted).sum(), counted.sum())).long()
