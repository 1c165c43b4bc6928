"""Chat replies that record which experts every generated token used (the prompts come from
`gpt_moe.data.chat_template`).

`ReplyStream` streams the text of one reply from the latent-cache decoder and records, for every
generated token and every MoE layer of the main model, the experts the router chose. The routing
of token t is the routing of the forward pass whose logits produced t: the prompt's last position
(prefill) for the first token, then the previous token's decode step. The MTP block is not run
when decoding, so it does not appear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt_moe.checkpoint.loading import LoadedModel, load_for_inference
from gpt_moe.checkpoint.model_dir import TRAIN_HINT
from gpt_moe.checkpoint.records import RUNS_DIR, newest_under
from gpt_moe.data.chat_template import (ChatPrompt, continuation_prompt, end_of_text_id, fit_chat, prompt_budget,
                                        reply_stop_ids)
from gpt_moe.errors import CheckpointError
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.moe import recording_routing
from gpt_moe.serve.generate import DecodeStats, SamplingConfig, TextStream, generate_ids

if TYPE_CHECKING:
    from gpt_moe.data.tokenizer_format import Tokenizer

# ---------------------------------------------------------------------------------------- routing


@dataclass
class RoutingRecord:
    """Experts chosen for each generated token: `experts[t][layer] = [k global expert ids]`."""

    layers: list[int]  # decoder-layer indices of the main MoE layers, in order
    n_experts: int
    k: int
    token_ids: list[int] = field(default_factory=list)
    experts: list[dict[int, list[int]]] = field(default_factory=list)

    def append(self, token_id: int, experts: dict[int, list[int]]) -> None:
        self.token_ids.append(token_id)
        self.experts.append(experts)

    def __len__(self) -> int:
        return len(self.token_ids)

    def as_tensor(self) -> torch.Tensor:
        """[tokens, layers, k] expert ids (layers in `self.layers` order)."""
        return torch.tensor([[e[layer] for layer in self.layers] for e in self.experts],
                            dtype=torch.long).view(len(self), len(self.layers), self.k)

    def load_by_layer(self) -> torch.Tensor:
        """[layers, n_experts] number of (token, slot) assignments to each expert in each layer."""
        ids = self.as_tensor()
        return torch.stack([torch.bincount(ids[:, j].flatten(), minlength=self.n_experts)
                            for j in range(len(self.layers))]) if self.layers else torch.zeros(0, self.n_experts)

    def load(self) -> list[int]:
        """[n_experts] assignments of the reply summed over layers (sum = tokens * k * layers)."""
        return self.load_by_layer().sum(dim=0).long().tolist()


class ReplyStream:
    """One reply: iterate for its text pieces; afterwards `text`, `token_ids`, `routing` and
    `finish_reason` ("stop": an end marker or a stop string of `sampling.stop`, "length": max_new_tokens) describe it.
    The text ends before the first stop string; decoded text that could begin one is held back until decided.
    Sampling stays within the tokenizer's vocabulary (`sampling.vocab_limit`, unless set).

    `lock` serialises the model between replies generated in different threads: it is held for
    one decode step at a time (the forward pass, sampling and reading the routing), so replies
    interleave token by token and an abandoned reply holds nothing.
    """

    def __init__(self, model: DeepSeekForCausalLM, tokenizer: Tokenizer, prompt: ChatPrompt, sampling: SamplingConfig,
                 lock: threading.Lock | None = None, stop_ids: set[int] | None = None) -> None:
        if sampling.vocab_limit is None:  # the model may have more embedding rows than its tokenizer has tokens
            sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.n_vocab)
        self.model, self.tokenizer, self.prompt, self.sampling = model, tokenizer, prompt, sampling
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.stop_ids = reply_stop_ids(tokenizer) if stop_ids is None else stop_ids
        self.moe_layers = model.moe_layers(include_mtp=False)
        config = model.config
        self.routing = RoutingRecord([i for i, _ in self.moe_layers], config.n_routed_experts,
                                     config.num_experts_per_tok)
        self.text = ""
        self.finish_reason: str | None = None
        self.stats = DecodeStats()  # tokens and, with sampling.speculative, MTP drafts proposed and accepted
        self.seconds = 0.0  # from the start of generation to the newest token (prefill included)
        self._forward_routing: dict[int, torch.Tensor] = {}  # expert ids of the newest main forward, by layer

    @property
    def token_ids(self) -> list[int]:
        return self.routing.token_ids

    @property
    def tokens_per_second(self) -> float | None:
        return len(self.routing) / self.seconds if self.seconds > 0 else None

    def __iter__(self) -> Iterator[str]:
        decoder = TextStream(self.tokenizer)
        # decoded text that could be the beginning of a stop string is held back until it is decided
        hold = max((len(stop) for stop in self.sampling.stop), default=1) - 1
        decoded, start = "", time.perf_counter()
        tokens = generate_ids(self.model, [self.prompt.ids], self.sampling, self.stop_ids, self.stats)
        try:
            while (step := self._step(tokens)) is not None:
                self.seconds = time.perf_counter() - start
                token, experts = step
                self.routing.append(token, experts)
                if token in self.stop_ids:
                    self.finish_reason = "stop"
                    break
                decoded += decoder.push(token)
                cut = self._stop_string_at(decoded, hold)
                if cut is not None:
                    self.finish_reason = "stop"
                    yield from self._emit(decoded[:cut])
                    return
                yield from self._emit(decoded[:len(decoded) - hold])
            else:
                self.seconds = time.perf_counter() - start
                self.finish_reason = "length"
            decoded += decoder.flush()
            cut = self._stop_string_at(decoded, hold)
            yield from self._emit(decoded if cut is None else decoded[:cut])
        finally:
            tokens.close()

    def _stop_string_at(self, decoded: str, hold: int) -> int | None:
        """Where the first stop string (`sampling.stop`) begins in the decoded text, or None."""
        since = max(0, len(self.text) - hold)
        found = [i for i in (decoded.find(stop, since) for stop in self.sampling.stop) if i >= 0]
        return min(found) if found else None

    def _emit(self, upto: str) -> Iterator[str]:
        """Yields what `upto` (a prefix of the decoded text) adds to the text yielded so far."""
        piece = upto[len(self.text):]
        if piece:
            self.text += piece
            yield piece

    def _step(self, tokens: Iterator[torch.Tensor]) -> tuple[int, dict[int, list[int]]] | None:
        """Next token and its routing {layer: [k expert ids]}, or None when generation ended."""
        with self.lock, recording_routing(self.moe_layers):
            next_ids = next(tokens, None)
            if next_ids is None:
                return None
            if any(moe.last_expert_ids is not None for _, moe in self.moe_layers):  # this step ran the model
                self._forward_routing = {i: moe.last_expert_ids for i, moe in self.moe_layers}
        # the position of the newest forward whose logits chose this token (the last one, or with speculative
        # decoding possibly the one before: see DecodeStats.predictor) holds this token's routing
        return int(next_ids[0]), {i: ids[0, self.stats.predictor].tolist() for i, ids in self._forward_routing.items()}


def generate_reply(model: DeepSeekForCausalLM, tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                   sampling: SamplingConfig, lock: threading.Lock | None = None) -> ReplyStream:
    """A `ReplyStream` for the conversation, its prompt fitted into the model's context
    (`max_position_embeddings - max_new_tokens` tokens)."""
    prompt = fit_chat(tokenizer, messages, prompt_budget(model.config.max_position_embeddings, sampling.max_new_tokens))
    return ReplyStream(model, tokenizer, prompt, sampling, lock)


def generate_continuation(model: DeepSeekForCausalLM, tokenizer: Tokenizer, text: str, sampling: SamplingConfig,
                          lock: threading.Lock | None = None) -> ReplyStream:
    """What a base model is good for: a `ReplyStream` continuing `text` as a document (no role markers; the end
    of an overlong text is kept), ending at `<|endoftext|>` (a published model's EOS)."""
    prompt = continuation_prompt(tokenizer, text, prompt_budget(model.config.max_position_embeddings,
                                                                sampling.max_new_tokens))
    return ReplyStream(model, tokenizer, prompt, sampling, lock, stop_ids={end_of_text_id(tokenizer)})


# ----------------------------------------------------------------- shared by app.py and sample.py


def load_chat_model(path: str | Path | None, runs_dir: str | Path = RUNS_DIR) -> LoadedModel:
    """`load_for_inference(path)`, or of the newest complete checkpoint under `runs_dir` when `path` is
    None (CheckpointError when there is none)."""
    if path is None:
        path = newest_under(runs_dir)
        if path is None:
            raise CheckpointError(f"no complete checkpoint under {Path(runs_dir).resolve()}/; {TRAIN_HINT}, "
                                  "or pass --checkpoint PATH")
    return load_for_inference(path)
