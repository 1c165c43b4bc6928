"""Self-speculative decoding: the model's MTP block drafts, the main model verifies (batch 1).

Each step the MTP block drafts k tokens by chaining itself (DeepSeek-V3 sec. 2.2 and 5.4.3; the chain as in
EAGLE, Li et al. 2024): its first pass reads the main model's newest hidden state and the newest token and
proposes the token after it; each further pass reads the block's own output (in place of the main model's
hidden state, which does not exist yet for a drafted token) and its own draft, and proposes one more. One main
forward over [newest, draft 1 .. draft k] (k+1 positions, latent cache) then scores every draft at once and
already gives the logits of the token after the last one. The longest acceptable prefix of the drafts is kept,
followed by the main model's own token (the correction at the first rejected draft, or the bonus token after
k accepted ones), so a step yields 1 .. k+1 tokens for one main forward; the latent caches (the main model's
and the block's own) are rolled back to what was kept.

* Greedy: a draft is acceptable exactly when it is the main model's choice there, so the tokens are those of
  plain greedy decoding, whatever k.
* Sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) applied draft by draft,
  each draft against the target distribution after the drafts before it: accept with min(1, p/q), otherwise
  draw from the normalised residual max(0, p - q) and stop; all accepted: the bonus token from p. Every token
  that comes out is distributed as plain sampling would draw it.

The MTP block keeps its own latent cache over the positions it read from the main model: at position t it
holds eh_proj([enorm(embed(token t+1)); hnorm(h_t)]), as in training. A chain's extra positions are written
there only for the chain and rewound after it: the next step reads the main model's hidden states of the
verified positions in their place.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpt_moe.errors import ConfigError
from gpt_moe.model.attention import LatentCache
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.sampling import DecodeStats, SamplingConfig, new_generator, sample_next, sampling_logits


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
    """Batch-1 decoding with the model's own MTP block as the draft model, `draft_tokens` drafts per step (see
    the module docstring). `accept` (default `speculative_accept`) is the sampling rule; greedy needs none.

    State between steps: `context` [1, n] every token so far (the newest not yet through the main model); the main
    caches hold positions 0 .. n-2; `pending_hidden` [1, m, hidden] the main model's hidden states the MTP block
    has yet to read, at the positions after its cache's, and `pending_next` [1, m] the token after each.
    """

    def __init__(self, model: DeepSeekForCausalLM, sampling: SamplingConfig, capacity: int,
                 generator: torch.Generator | None = None, accept=speculative_accept) -> None:
        """capacity: prompt + new tokens + sampling.draft_tokens (the drafts' slots)."""
        self.mtp = model.model.mtp_layer
        if self.mtp is None:
            raise ConfigError("speculative decoding needs the model's MTP block, and this model has none "
                              "(num_nextn_predict_layers 0)")
        for name in ("draft_tokens", "draft_vocab"):
            value = getattr(sampling, name)
            if value is not None and value < 1:
                raise ConfigError(f"speculative decoding: {name} {value}: expected 1 or more")
        self.model, self.sampling, self.generator, self.accept = model, sampling, generator, accept
        self.greedy = sampling.temperature <= 0
        self.caches = model.new_cache(1, capacity)
        weight = model.lm_head.weight
        self.mtp_cache = LatentCache.empty(model.config, 1, capacity, weight.device, weight.dtype)
        self.stats = DecodeStats()
        # the rows of the output head the drafts are scored with: a view, no copy
        self.vocab = min(sampling.vocab_limit or weight.shape[0], weight.shape[0])
        self.draft_head = weight[: min(sampling.draft_vocab or self.vocab, self.vocab)]

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt: [1, len] -> the first new token [1] (the main model's choice)."""
        logits, hidden = self.model.decode_step(prompt, self.caches, last_logits=1)
        token = sample_next(logits[:, -1], prompt, self.sampling, self.generator)
        self.context = torch.cat((prompt, token[:, None]), dim=1)
        if prompt.shape[1] > 1:  # the MTP block reads the prompt's positions 0..len-2 now, as part of the prefill
            self._mtp_read(hidden[:, :-1], prompt[:, 1:])
        # what the MTP block has yet to read: the last hidden state and the token after it
        self.pending_hidden, self.pending_next = hidden[:, -1:], token[:, None]
        return token

    def _mtp_read(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """hidden: [1, k, hidden] hidden states at the MTP cache's next k positions (the main model's, or in a
        chain the block's own); next_ids: [1, k] the tokens after them -> the block's output before its norm
        [1, k, hidden] (its cache grows by k)."""
        start = self.mtp_cache.length
        positions = torch.arange(start, start + next_ids.shape[1], device=next_ids.device)
        cos, sin = self.model.model.rotary_emb(positions, hidden.dtype)
        return self.mtp.decode(hidden, self.model.model.embed_tokens(next_ids), cos, sin, self.mtp_cache)

    def draft(self, count: int) -> tuple[list[int], list[torch.Tensor]]:
        """The MTP block reads its pending inputs and chains itself `count` times -> (drafts, the distribution
        each was drawn from [vocab_limit]; greedy: the logits it was the argmax of). Its cache keeps only what it
        read from the main model."""
        out = self._mtp_read(self.pending_hidden, self.pending_next)[:, -1:]
        read = self.mtp_cache.length
        drafts, dists, context = [], [], self.context
        for j in range(count):
            if j:  # the block's own output and draft stand for the main model's hidden state and token
                out = self._mtp_read(out, context[:, -1:])
            logits = sampling_logits(self._draft_logits(out[:, -1]), context, self.sampling)[0]
            if self.greedy:
                draft, dist = int(logits.argmax()), logits
            else:
                dist = logits.softmax(dim=-1)
                draft = int(torch.multinomial(dist, 1, generator=self.generator))
            drafts.append(draft)
            dists.append(dist)
            if j + 1 < count:
                context = torch.cat((context, context.new_tensor([[draft]])), dim=1)
        self.mtp_cache.rewind(read)
        return drafts, dists

    def _draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """out: [1, hidden] the MTP block's output -> [1, vocab] logits of its draft, -inf beyond the draft
        vocabulary (`sampling.draft_vocab`: scoring the first ids only makes a draft over a large vocabulary
        cheap; tokens it leaves out are never drafted, and the main model's choice takes their place)."""
        logits = F.linear(self.mtp.shared_head.norm(out), self.draft_head)
        if logits.shape[-1] == self.vocab:
            return logits
        return torch.cat((logits, logits.new_full((1, self.vocab - logits.shape[-1]), float("-inf"))), dim=-1)

    def step(self, draft_tokens: int | None = None) -> list[int]:
        """Drafts `draft_tokens` (default sampling.draft_tokens) tokens, verifies them in one main forward, and
        returns the 1 .. draft_tokens + 1 new tokens (the newest token is already in `context`)."""
        drafts, dists = self.draft(draft_tokens or self.sampling.draft_tokens)
        block = torch.cat((self.context[:, -1:], self.context.new_tensor([drafts])), dim=1)
        logits, hidden = self.model.decode_step(block, self.caches)
        tokens = self._verify(drafts, dists, logits[0])
        accepted = len(tokens) - 1
        self.stats.count_step(len(drafts), accepted)
        for cache in self.caches:  # keep the newest token and the accepted drafts: forget the rejected ones
            cache.rewind(cache.length - len(drafts) + accepted)
        self.context = torch.cat((self.context, self.context.new_tensor([tokens])), dim=1)
        self.pending_hidden, self.pending_next = hidden[:, :accepted + 1], self.context[:, -len(tokens):]
        return tokens

    def _verify(self, drafts: list[int], dists: list[torch.Tensor], logits: torch.Tensor) -> list[int]:
        """logits: [k+1, vocab] the main model's at [newest, draft 1 .. draft k] -> the accepted drafts followed
        by the main model's own token (the correction at the first rejected draft, or the bonus after all)."""
        if self.greedy and self.sampling.repetition_penalty == 1.0:  # one argmax over every position
            choices = logits[:, : self.sampling.vocab_limit].argmax(dim=-1).tolist()
            accepted = next((j for j, (d, c) in enumerate(zip(drafts, choices)) if d != c), len(drafts))
            return drafts[:accepted] + [choices[accepted]]
        tokens, context = [], self.context
        for j, draft in enumerate(drafts):
            target = sampling_logits(logits[j:j + 1], context, self.sampling)
            if self.greedy:
                token = int(target.argmax())
                accepted = token == draft
            else:
                accepted, token = self.accept(target[0].softmax(dim=-1), dists[j], draft, self.generator)
            tokens.append(token)
            if not accepted:
                return tokens
            context = torch.cat((context, context.new_tensor([[token]])), dim=1)
        bonus = sample_next(logits[-1:], context, self.sampling, self.generator)
        return tokens + [int(bonus)]

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


@torch.no_grad()
def speculative_ids(model: DeepSeekForCausalLM, prompts: list[list[int]], sampling: SamplingConfig,
                    stop_ids: set[int], stats: DecodeStats) -> Iterator[torch.Tensor]:
    """`generate_ids` through a `SelfSpeculativeDecoder`: yields [1] per token. A step never drafts past
    max_new_tokens (its last token is the main model's own)."""
    if len(prompts) != 1:
        raise ConfigError(f"speculative decoding takes one prompt at a time, got a batch of {len(prompts)}")
    device = model.lm_head.weight.device
    capacity = len(prompts[0]) + sampling.max_new_tokens + sampling.draft_tokens
    decoder = SelfSpeculativeDecoder(model, sampling, capacity, new_generator(sampling, device))
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
        tokens = decoder.step(min(sampling.draft_tokens, max(1, sampling.max_new_tokens - emitted - 1)))
        predictors = range(len(tokens))  # the j-th token of a step was chosen at the verifying forward's position j
