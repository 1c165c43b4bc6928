"""Bits per byte: a language model's loss that does not depend on its tokenizer.

Validation loss in nats per token depends on how the tokenizer cuts text: a larger vocabulary makes fewer, harder
tokens. Dividing the total nats by the UTF-8 bytes the target tokens decode to (instead of by their count) gives
the bits a model needs per byte of text, a figure that runs with different tokenizers share:

    bpb = sum(nats over target tokens) / (ln 2 * sum(UTF-8 bytes of those tokens))

Only tokens that stand for text count: special tokens (end of text, chat markers, a published model's BOS/EOS)
and masked-out positions (label -100: prompts in fine-tuning, padding) add neither nats nor bytes.

    lengths = token_byte_lengths(tokenizer, model.config.vocab_size)     # int64 [vocab]
    totals = nats_and_bytes(out.token_nats, labels, lengths)             # float64 [2], summed over batches
    bits_per_byte(totals)
"""

from __future__ import annotations

import math

import torch

from gpt_moe.data.tokenizer_format import Tokenizer
from gpt_moe.model.loss import IGNORE_INDEX


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """int64 [max(vocab_size, n_vocab)]: the UTF-8 bytes each token id decodes to; 0 for special tokens, for ids
    the tokenizer does not define, and for the ids past its vocabulary a model may have."""
    size = max(vocab_size or 0, tokenizer.n_vocab)
    special = {tokenizer.encode_single_token(text) for text in tokenizer.special_tokens_set}
    lengths = torch.zeros(size, dtype=torch.int64)
    for token in range(tokenizer.n_vocab):
        if token not in special:
            try:
                lengths[token] = len(tokenizer.decode_single_token_bytes(token))
            except KeyError:  # a hole in the ids
                pass
    return lengths


def nats_and_bytes(token_nats: torch.Tensor, labels: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """token_nats, labels: [batch, seq] (the model's `token_nats`, its labels); byte_lengths: [vocab] ->
    float64 [2]: (sum of nats, sum of bytes) over the positions whose label is a text token."""
    valid = labels != IGNORE_INDEX
    lengths = byte_lengths.to(labels.device)[labels.masked_fill(~valid, 0)] * valid  # [batch, seq]
    text = lengths > 0
    return torch.stack([(token_nats.double() * text).sum(), lengths.double().sum()]).cpu()


def bits_per_byte(totals: torch.Tensor) -> float:
    """totals: (sum of nats, sum of bytes) -> bits per byte; NaN when no byte was counted."""
    nats, count = totals.tolist()
    return nats / (math.log(2) * count) if count > 0 else float("nan")
