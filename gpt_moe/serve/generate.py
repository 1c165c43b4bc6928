"""Text generation: latent-cache decoding, stop conditions, streaming.

`generate_ids` prefills a (left-padded) batch of prompts in one pass, then decodes one token
per step from the MLA latent cache (`DeepSeekForCausalLM.decode_step`), or with `sampling.speculative`
several per step (`gpt_moe.serve.speculative`). Sampling (`gpt_moe.serve.sampling`) applies, in
order: repetition penalty, temperature, top-k, top-p; temperature 0 is greedy.
`TextStream` turns token ids into text pieces that never split a multi-byte character;
`gpt_moe.serve.chat.ReplyStream` is the one loop from tokens to text (stop strings, routing, speed) that the app
and the sampler both use.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.sampling import DecodeStats, SamplingConfig, new_generator, sample_next, sampling_logits
from gpt_moe.serve.speculative import SelfSpeculativeDecoder, speculative_accept, speculative_ids

__all__ = ["DecodeStats", "SamplingConfig", "SelfSpeculativeDecoder", "TextStream", "generate_ids", "sample_next",
           "sampling_logits", "speculative_accept"]


def generate_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig,
                 stop_ids: set[int] = frozenset(), stats: DecodeStats | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every prompt, [batch], once per step, until all rows stopped
    (a row stops at a token in stop_ids; later yields repeat that token) or max_new_tokens.
    With sampling.speculative: self-speculative decoding (`SelfSpeculativeDecoder`), one prompt only."""
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    stats = stats if stats is not None else DecodeStats()
    if sampling.speculative:
        return speculative_ids(model, prompts, sampling, stop_ids, stats)
    return _plain_ids(model, prompts, sampling, stop_ids, stats)


@torch.no_grad()
def _plain_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
               stats: DecodeStats) -> Iterator[torch.Tensor]:
    """One token per step from the latent cache; rows left-padded to a common length. Per step: one forward and
    the sampler; the context grows in a buffer allocated once, and without padding there is no mask at all."""
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + sampling.max_new_tokens
    context = torch.zeros(batch, total, dtype=torch.long, device=device)  # prompts (left-padded), then new tokens
    key_mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is aligned
        context[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
        key_mask[row, longest - len(prompt):] = True
    padded = any(len(p) < longest for p in prompts)
    positions = (key_mask[:, :longest].long().cumsum(1) - 1).clamp(min=0)
    generator = new_generator(sampling, device)

    caches = model.new_cache(batch, total)
    logits, _ = model.decode_step(context[:, :longest], caches, positions=positions,
                                  key_mask=key_mask[:, :longest] if padded else None, last_logits=1)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    for step in range(sampling.max_new_tokens):
        length = longest + step
        next_ids = sample_next(logits[:, -1], context[:, :length], sampling, generator)
        if batch > 1:  # a finished row repeats its last token
            next_ids = torch.where(finished, context[:, length - 1], next_ids)
        stats.tokens += 1
        yield next_ids
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == sampling.max_new_tokens - 1:
            return
        context[:, length] = next_ids
        positions = positions[:, -1:] + 1
        logits, _ = model.decode_step(context[:, length:length + 1], caches, positions=positions,
                                      key_mask=key_mask[:, :length + 1] if padded else None)


class TextStream:
    """Incremental detokenizer: feed token ids, get text pieces that are whole UTF-8 characters.

    A character split over several tokens is held back until complete; bytes that can never be
    valid UTF-8 (an undertrained model emits such sequences) become U+FFFD at once, so the stream
    never stalls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id >= self.tokenizer.n_vocab:  # a model may have more embedding rows than its tokenizer has tokens
            return ""
        return self.decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
