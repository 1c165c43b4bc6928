"""Text generation: latent-cache decoding, sampling, stop conditions, streaming.

`generate_ids` prefills a (left-padded) batch of prompts in one pass, then decodes one token
per step from the MLA latent cache (`DeepSeekForCausalLM.decode_step`). Sampling applies, in
order: repetition penalty, temperature, top-k, top-p; temperature 0 is greedy.
`TextStream` turns token ids into text pieces that never split a multi-byte character;
`gpt_moe.serve.chat.ReplyStream` is the one loop from tokens to text (stop strings, routing, speed) that the app
and the sampler both use.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gpt_moe.errors import ConfigError
from gpt_moe.model.attention import LatentCache
from gpt_moe.model.model import DeepSeekForCausalLM


@dataclass
class SamplingConfig:
    """How to sample: the one home of the sampling defaults (the app, `launch/sample.py` and the evaluations start
    from these)."""

    max_new_tokens: int = 128
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: off
    top_p: float = 0.95  # 1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL, Keskar et al. 2019)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    vocab_limit: int | None = None  # sample only ids below this (the tokenizer's n_vocab; the model may have more rows)
    speculative: bool = False  # draft with the model's MTP block, verify with the main model (batch 1)


@dataclass
class DecodeStats:
    """What one generation did; `generate_ids` fills it in when given one.

    `predictor` is, for the token just yielded, the index among the last main forward's positions of the
    position whose logits chose it (-1 in plain decoding; -2 for a verified draft, whose step also fed the
    draft itself), so a caller can read that position's routing."""

    tokens: int = 0
    drafted: int = 0  # speculative: drafts proposed by the MTP block
    accepted: int = 0  # speculative: drafts the main model accepted
    predictor: int = -1

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def sampling_logits(logits: torch.Tensor, context: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """logits: [batch, vocab] -> [batch, vocab_limit] fp32 logits the sampler draws from: repetition penalty,
    then (unless greedy) temperature, top-k and top-p, with the cut-off tokens at -inf."""
    logits = logits[:, : sampling.vocab_limit].float().clone()
    if sampling.repetition_penalty != 1.0 and context.numel():
        seen = logits.gather(1, context)
        logits.scatter_(1, context, torch.where(seen > 0, seen / sampling.repetition_penalty,
                                                seen * sampling.repetition_penalty))
    if sampling.temperature <= 0:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, context: torch.Tensor, sampling: SamplingConfig,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: [batch, vocab] fp32; context: [batch, len] ids seen so far -> next ids [batch]."""
    logits = sampling_logits(logits, context, sampling)
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def generate_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig,
                 stop_ids: set[int] = frozenset(), stats: DecodeStats | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every prompt, [batch], once per step, until all rows stopped
    (a row stops at a token in stop_ids; later yields repeat that token) or max_new_tokens.
    With sampling.speculative: self-speculative decoding (`SelfSpeculativeDecoder`), one prompt only."""
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    stats = stats if stats is not None else DecodeStats()
    if sampling.speculative:
        return _speculative_ids(model, prompts, sampling, stop_ids, stats)
    return _plain_ids(model, prompts, sampling, stop_ids, stats)


@torch.no_grad()
def _plain_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
               stats: DecodeStats) -> Iterator[torch.Tensor]:
    """One token per step from the latent cache; rows left-padded to a common length."""
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(batch, longest + sampling.max_new_tokens, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is aligned
        ids[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        key_mask[row, longest - len(prompt):] = True
    key_mask[:, longest:] = True
    positions = (key_mask[:, :longest].long().cumsum(1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None

    caches = model.new_cache(batch, longest + sampling.max_new_tokens)
    logits, _ = model.decode_step(ids, caches, positions=positions, key_mask=key_mask[:, :longest])
    context = ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    for step in range(sampling.max_new_tokens):
        next_ids = sample_next(logits[:, -1], context, sampling, generator)
        next_ids = torch.where(finished, context[:, -1], next_ids)
        stats.tokens += 1
        yield next_ids
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == sampling.max_new_tokens - 1:
            return
        context = torch.cat((context, next_ids[:, None]), dim=1)
        positions = positions[:, -1:] + 1
        logits, _ = model.decode_step(next_ids[:, None], caches, positions=positions,
                                      key_mask=key_mask[:, :longest + step + 1])


# ------------------------------------------------------------------ self-speculative decoding
def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int,
                       generator: torch.Generator | None) -> tuple[bool, int]:
    """The speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023). p, q: [vocab] the target's and
    the draft's sampling distributions; draft ~ q. Accepts the draft with probability min(1, p/q) at it, else
    draws from the normalised residual max(0, p - q): the token that comes out is distributed as p.
    Returns (accepted, token)."""
    ratio = float(p[draft] / q[draft])
    if ratio >= 1.0 or (ratio > 0.0 and float(torch.rand((), generator=generator)) < ratio):
        return True, draft
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is right
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


class SelfSpeculativeDecoder:
    """Batch-1 decoding with the model's own MTP block as the draft model (DeepSeek-V3 sec. 5.4.3).

    Each `step` the MTP block reads the main model's last hidden state and the newest token and proposes the
    token after it; one main forward over [newest, draft] (two positions, latent cache) verifies the draft
    and already gives the logits of the token after the draft. An accepted draft yields two tokens for one
    main forward; a rejected one yields the main model's own choice and the cache is rolled back by one
    position. Greedy: accepted iff the draft is the main model's argmax, so the tokens are those of plain
    greedy decoding. Sampling: `accept` (default `speculative_accept`), so the distribution is unchanged.

    The MTP block keeps its own latent cache: at position t it attends over its inputs at positions <= t,
    eh_proj([enorm(embed(token t+1)); hnorm(h_t)]), as in training.
    """

    def __init__(self, model: DeepSeekForCausalLM, sampling: SamplingConfig, capacity: int,
                 generator: torch.Generator | None = None, accept=speculative_accept) -> None:
        """capacity: prompt + new tokens + 1 (the draft's slot)."""
        self.mtp = model.model.mtp_layer
        if self.mtp is None:
            raise ConfigError("speculative decoding needs the model's MTP block, and this model has none "
                              "(num_nextn_predict_layers 0)")
        self.model, self.sampling, self.generator, self.accept = model, sampling, generator, accept
        self.greedy = sampling.temperature <= 0
        self.caches = model.new_cache(1, capacity)
        weight = model.lm_head.weight
        self.mtp_cache = LatentCache.empty(model.config, 1, capacity, weight.device, weight.dtype)
        self.stats = DecodeStats()

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: [1, len] -> the first new token [1] (the main model's choice)."""
        logits, hidden = self.model.decode_step(prompt, self.caches)
        token = sample_next(logits[:, -1], prompt, self.sampling, self.generator)
        self.context = torch.cat((prompt, token[:, None]), dim=1)
        if prompt.shape[1] > 1:  # the MTP block reads the prompt's positions 0..len-2 now, as part of the prefill
            self._mtp_read(hidden[:, :-1], prompt[:, 1:])
        # what the MTP block has yet to read: the last hidden state and the token after it
        self.pending_hidden, self.pending_next = hidden[:, -1:], token[:, None]
        return token

    def _mtp_read(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """hidden: [1, k, hidden] main hidden states at the MTP cache's next k positions; next_ids: [1, k] the
        tokens after them -> the MTP block's normalised output [1, k, hidden] (its cache grows by k)."""
        start = self.mtp_cache.length
        positions = torch.arange(start, start + next_ids.shape[1], device=next_ids.device)
        cos, sin = self.model.model.rotary_emb(positions, hidden.dtype)
        out, _ = self.mtp.predict(hidden, self.model.model.embed_tokens(next_ids), cos, sin, cache=self.mtp_cache)
        return out

    def _draft(self) -> tuple[int, torch.Tensor]:
        """The MTP block reads its pending inputs; returns (draft, its distribution q [vocab])."""
        out = self._mtp_read(self.pending_hidden, self.pending_next)
        logits = sampling_logits(self.model.lm_head(out[:, -1]), self.context, self.sampling)[0]
        if self.greedy:
            return int(logits.argmax()), logits
        q = logits.softmax(dim=-1)
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    def step(self) -> list[int]:
        """Drafts, verifies, and returns the 1 or 2 new tokens (the newest token is already in `context`)."""
        draft, q = self._draft()
        newest = self.context[:, -1:]
        pair = torch.cat((newest, torch.tensor([[draft]], device=newest.device)), dim=1)
        logits, hidden = self.model.decode_step(pair, self.caches)
        if self.greedy:
            first = int(sample_next(logits[:, 0], self.context, self.sampling, None))
            accepted = first == draft
        else:
            p = sampling_logits(logits[:, 0], self.context, self.sampling)[0].softmax(dim=-1)
            accepted, first = self.accept(p, q, draft, self.generator)
        self.stats.drafted += 1
        self.stats.accepted += accepted
        self._extend(first)
        if not accepted:
            for cache in self.caches:
                cache.rewind(cache.length - 1)  # the rejected draft's position
            self.pending_hidden, self.pending_next = hidden[:, :1], self.context[:, -1:]
            return [first]
        bonus = int(sample_next(logits[:, 1], self.context, self.sampling, self.generator))
        self._extend(bonus)
        self.pending_hidden, self.pending_next = hidden, self.context[:, -2:]
        return [draft, bonus]

    def snapshot(self) -> tuple:
        """What `restore` needs to return to this point (cache entries stay; their lengths are recorded)."""
        return (self.context, self.pending_hidden, self.pending_next, self.mtp_cache.length,
                [cache.length for cache in self.caches])

    def restore(self, state: tuple) -> None:
        """Back to an earlier `snapshot` of this decoder (the benchmark decodes the same tokens again)."""
        self.context, self.pending_hidden, self.pending_next, mtp_length, lengths = state
        self.mtp_cache.rewind(mtp_length)
        for cache, length in zip(self.caches, lengths):
            cache.rewind(length)

    def _extend(self, token: int) -> None:
        self.context = torch.cat((self.context, self.context.new_tensor([[token]])), dim=1)


@torch.no_grad()
def _speculative_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig,
                     stop_ids: set[int], stats: DecodeStats) -> Iterator[torch.Tensor]:
    """`generate_ids` through a `SelfSpeculativeDecoder`: yields [1] per token."""
    if len(prompts) != 1:
        raise ConfigError(f"speculative decoding takes one prompt at a time, got a batch of {len(prompts)}")
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    decoder = SelfSpeculativeDecoder(model, sampling, len(prompts[0]) + sampling.max_new_tokens + 1, generator)
    decoder.stats = stats
    tokens, predictors = decoder.prefill(torch.tensor([prompts[0]], device=device)).tolist(), [-1]
    emitted = 0
    while True:
        for token, predictor in zip(tokens, predictors):
            emitted += 1
            stats.tokens += 1
            stats.predictor = predictor
            yield torch.tensor([token], device=device)
            if token in stop_ids or emitted == sampling.max_new_tokens:
                return
        tokens = decoder.step()
        predictors = [-2, -1] if len(tokens) == 2 else [-2]


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
