"""What to sample and how: `SamplingConfig` (the one home of the sampling defaults), `DecodeStats` (what a
generation did), and the sampler itself: repetition penalty, then temperature, top-k and top-p; temperature 0
is greedy. Plain decoding (`gpt_moe.serve.generate`) and self-speculative decoding (`gpt_moe.serve.speculative`)
both draw through `sampling_logits`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_DRAFT_TOKENS = 1
"""Drafts per speculative step (the MTP block chained this many times). Measured on the trained `tiny`
(docs/benchmarks.md): one draft is never slower than plain decoding (1.04-1.08x); two or three win at 256 tokens
of context (1.12x, 1.16x) and lose at 1024 (0.98x, 0.93x), where the drafts are accepted less often. A chain pays
where a draft pass is cheap next to a step (`small` with `draft_vocab`: 0.09 of a step) and acceptance is high."""


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
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # speculative: drafts per step (the MTP block chained this many times)
    draft_vocab: int | None = None  # speculative: the drafts come from the first this many ids (None: all it may draw)


@dataclass
class DecodeStats:
    """What one generation did; `generate_ids` fills it in when given one.

    `predictor` is, for the token just yielded, the index among the last main forward's positions of the
    position whose logits chose it (-1 in plain decoding and for the prefill's token; j for the j-th token a
    speculative step yields, its forward being over [newest, drafts ...]), so a caller can read that position's
    routing.

    Speculative decoding: `forwards` main-model forwards verified `drafted` drafts and accepted `accepted`;
    `reached[j]` counts the steps whose (j+1)-th draft was checked (every draft before it accepted) and
    `accepted_at[j]` those that accepted it."""

    tokens: int = 0
    drafted: int = 0  # speculative: drafts proposed by the MTP block
    accepted: int = 0  # speculative: drafts the main model accepted
    forwards: int = 0  # speculative: verifying main-model forwards (steps after the prefill)
    reached: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    predictor: int = -1

    @property
    def acceptance(self) -> float | None:
        """The share of the drafts that became output."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accepted_length(self) -> float | None:
        """Mean tokens one verifying forward produced: its accepted drafts plus the main model's own token."""
        return (self.accepted + self.forwards) / self.forwards if self.forwards else None

    def acceptance_by_position(self) -> list[float]:
        """[j]: how often the (j+1)-th draft of a step was accepted when it was checked."""
        return [a / r for a, r in zip(self.accepted_at, self.reached) if r]

    def draft_summary(self) -> str:
        """One line for people: e.g. "MTP draft acceptance 61% (46/75 drafts), 1.92 tokens per forward (by draft:
        70%/48%)"."""
        if not self.drafted:
            return "MTP draft acceptance - (no drafts)"
        by_draft = "/".join(f"{a:.0%}" for a in self.acceptance_by_position())
        return (f"MTP draft acceptance {self.acceptance:.0%} ({self.accepted}/{self.drafted} drafts), "
                f"{self.accepted_length:.2f} tokens per forward" + (f" (by draft: {by_draft})" if len(self.reached) > 1
                                                                   else ""))

    def count_step(self, drafts: int, accepted: int) -> None:
        """Records one speculative step that verified `drafts` drafts and accepted the first `accepted`."""
        self.forwards += 1
        self.drafted += drafts
        self.accepted += accepted
        for counts in (self.reached, self.accepted_at):
            counts.extend([0] * (drafts - len(counts)))
        for j in range(min(accepted + 1, drafts)):
            self.reached[j] += 1
        for j in range(accepted):
            self.accepted_at[j] += 1


def sampling_logits(logits: torch.Tensor, context: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """logits: [batch, vocab] -> [batch, vocab_limit] fp32 logits the sampler draws from: repetition penalty,
    then (unless greedy) temperature, top-k and top-p, with the cut-off tokens at -inf."""
    logits = logits[:, : sampling.vocab_limit].float()
    if sampling.repetition_penalty != 1.0 and context.numel():
        logits = logits.clone()  # written in place below; `float()` returns the caller's tensor when already fp32
        seen = logits.gather(1, context)
        logits.scatter_(1, context, torch.where(seen > 0, seen / sampling.repetition_penalty,
                                                seen * sampling.repetition_penalty))
    if sampling.temperature <= 0:
        return logits
    logits = logits / sampling.temperature
    kept = logits.shape[-1]
    if sampling.top_k > 0 and sampling.top_k < kept:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        kept = int((logits > float("-inf")).sum(dim=-1).max())  # top_k, more where tokens tie with the k-th
    if sampling.top_p < 1.0:
        # the tokens in descending order: only the ones top-k kept (the rest are -inf), not the whole vocabulary
        sorted_logits, order = logits.topk(kept, dim=-1) if kept < logits.shape[-1] else \
            logits.sort(dim=-1, descending=True)
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


def new_generator(sampling: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """The seeded generator a generation draws from (None: torch's global one)."""
    return torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
