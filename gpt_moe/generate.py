"""Text generation: latent-cache decoding, sampling, stop conditions, streaming.

`generate_ids` prefills a (left-padded) batch of prompts in one pass, then decodes one token
per step from the MLA latent cache (`DeepSeekForCausalLM.decode_step`). Sampling applies, in
order: repetition penalty, temperature, top-k, top-p; temperature 0 is greedy.
`TextStream` turns token ids into text pieces that never split a multi-byte character.

`greedy_uncached` runs the full forward for every token: slow, but it needs nothing but
`forward`, so it also works inside a training engine whose parameters are sharded (ZeRO-3)
or whose experts live on other ranks (all ranks call it together).
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gpt_moe.model import DeepSeekForCausalLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 0.95  # 1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL, Keskar et al. 2019)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    vocab_limit: int | None = None  # sample only ids below this (the tokenizer's n_vocab; the model may have more rows)


def sample_next(logits: torch.Tensor, context: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: [batch, vocab] fp32; context: [batch, len] ids seen so far -> next ids [batch]."""
    logits = logits[:, : cfg.vocab_limit].float().clone()
    if cfg.repetition_penalty != 1.0 and context.numel():
        seen = logits.gather(1, context)
        logits.scatter_(1, context, torch.where(seen > 0, seen / cfg.repetition_penalty,
                                                seen * cfg.repetition_penalty))
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], cfg: SamplingConfig,
                 stop_ids: set[int] = frozenset()) -> Iterator[torch.Tensor]:
    """Yields the next token of every prompt, [batch], once per step, until all rows stopped
    (a row stops at a token in stop_ids; later yields repeat that token) or max_new_tokens."""
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(batch, longest + cfg.max_new_tokens, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is aligned
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        key_mask[row, longest - len(prompt):] = True
    key_mask[:, longest:] = True
    positions = (key_mask[:, :longest].long().cumsum(1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None

    caches = model.new_cache(batch, longest + cfg.max_new_tokens)
    logits, _ = model.decode_step(ids, caches, positions=positions, key_mask=key_mask[:, :longest])
    context = ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        next_ids = sample_next(logits[:, -1], context, cfg, generator)
        next_ids = torch.where(finished, context[:, -1], next_ids)
        yield next_ids
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == cfg.max_new_tokens - 1:
            return
        context = torch.cat((context, next_ids[:, None]), dim=1)
        positions = positions[:, -1:] + 1
        logits, _ = model.decode_step(next_ids[:, None], caches, positions=positions,
                                      key_mask=key_mask[:, :longest + step + 1])


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


def stream_text(model: DeepSeekForCausalLM, tokenizer, prompt_ids: list[int], cfg: SamplingConfig,
                stop_ids: set[int]) -> Iterator[str]:
    """Text pieces of one continuation; ends at a stop token, a stop string (not included) or the
    length limit. Text that could be the start of a stop string is held back until it is decided."""
    if cfg.vocab_limit is None:
        cfg = dataclasses.replace(cfg, vocab_limit=tokenizer.n_vocab)
    stream = TextStream(tokenizer)
    hold = max((len(s) for s in cfg.stop), default=1) - 1
    text, emitted = "", 0
    for next_ids in generate_ids(model, [prompt_ids], cfg, stop_ids):
        token = int(next_ids[0])
        if token in stop_ids:
            break
        text += stream.push(token)
        hits = [i for i in (text.find(s, max(0, emitted - hold)) for s in cfg.stop) if i >= 0]
        if hits:
            if min(hits) > emitted:
                yield text[emitted:min(hits)]
            return
        if len(text) - hold > emitted:
            yield text[emitted:len(text) - hold]
            emitted = len(text) - hold
    text += stream.flush()
    if len(text) > emitted:
        yield text[emitted:]


@torch.no_grad()
def greedy_uncached(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    vocab_limit: int | None = None) -> torch.Tensor:
    """input_ids: [batch, prompt] -> [batch, prompt + max_new_tokens], argmax of a full forward each step
    (over the first `vocab_limit` ids: a model may have more embedding rows than its tokenizer has tokens)."""
    ids = input_ids
    for _ in range(max_new_tokens):
        next_id = model(ids).logits[:, -1, :vocab_limit].argmax(dim=-1, keepdim=True)
        ids = torch.cat((ids, next_id), dim=1)
    return ids
