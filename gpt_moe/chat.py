"""The chat template, and chat replies that record which experts every generated token used.

Template (the same one fine-tuning will use), role markers as special tokens:

    <|system|>text<|end|><|user|>text<|end|><|assistant|>text<|end|>...<|user|>text<|end|><|assistant|>

The marker ids come from the tokenizer's special tokens and every message's text goes through
`encode_ordinary`, so text that spells a marker ("<|user|>") stays plain text and can never open
a turn. A reply ends at `<|end|>` or `<|endoftext|>`; any other role marker also ends it (the
model began a new turn).

`ReplyStream` streams the text of one reply from the latent-cache decoder and records, for every
generated token and every MoE layer of the main model, the experts the router chose. The routing
of token t is the routing of the forward pass whose logits produced t: the prompt's last position
(prefill) for the first token, then the previous token's decode step. The MTP block is not run
when decoding, so it does not appear.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt_moe.errors import CheckpointError, DataError
from gpt_moe.generate import DecodeStats, SamplingConfig, TextStream, generate_ids
from gpt_moe.loading import TRAIN_HINT, LoadedModel, find_newest_checkpoint, load_for_inference
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.moe import MoE
from gpt_moe.tokenizer import ASSISTANT, END, ENDOFTEXT, SYSTEM, USER

if TYPE_CHECKING:
    from tiktoken import Encoding

ROLE_MARKERS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
"""The same template for transformers' `apply_chat_template` (written into exported tokenizer configs); the
`{% generation %}` block marks what `render_conversation` trains on, so `return_assistant_tokens_mask=True`
gives our loss mask (what TRL's `assistant_only_loss` reads)."""


# --------------------------------------------------------------------------------------- template


def special_id(tokenizer: Encoding, token: str) -> int:
    """The id of special token `token` (a role marker or `<|endoftext|>`); DataError if absent."""
    if token not in tokenizer.special_tokens_set:
        raise DataError(f"tokenizer {tokenizer.name!r} has no special token {token}; "
                        "hint: tokenizers made by gpt_moe.tokenizer carry the chat markers")
    return tokenizer.encode_single_token(token)


def message_ids(tokenizer: Encoding, message: dict[str, str]) -> list[int]:
    """One turn: [role marker] + encode_ordinary(content) + [<|end|>]."""
    role = message.get("role")
    if role not in ROLE_MARKERS:
        raise DataError(f"chat message role {role!r}: expected one of {', '.join(ROLE_MARKERS)}")
    content = message.get("content", "")
    if not isinstance(content, str):
        raise DataError(f"chat message content: expected a string, got {type(content).__name__}")
    return [special_id(tokenizer, ROLE_MARKERS[role]), *tokenizer.encode_ordinary(content),
            special_id(tokenizer, END)]


def format_chat(tokenizer: Encoding, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation (list of {"role", "content"}), ending with `<|assistant|>` when
    `add_generation_prompt` (the model writes the reply next)."""
    ids = [token for message in messages for token in message_ids(tokenizer, message)]
    if add_generation_prompt:
        ids.append(special_id(tokenizer, ASSISTANT))
    return ids


def render_conversation(tokenizer: Encoding, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a whole conversation for fine-tuning: the ids of `format_chat(..., False)` and,
    per id, 1 where the model is trained to produce it -- every assistant message's text and its closing
    `<|end|>` -- and 0 for system and user turns and for every role marker (the marker that opens an
    assistant turn is part of the prompt: at inference the template writes it)."""
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        turn = message_ids(tokenizer, message)
        trained = 1 if message.get("role") == "assistant" else 0
        ids += turn
        mask += [0] + [trained] * (len(turn) - 1)
    return ids, mask


def reply_stop_ids(tokenizer: Encoding) -> set[int]:
    """Tokens that end a reply: `<|end|>`, `<|endoftext|>` and the markers that open another turn."""
    return {special_id(tokenizer, token) for token in (END, ENDOFTEXT, *ROLE_MARKERS.values())}


@dataclass
class ChatPrompt:
    ids: list[int]
    dropped_messages: int = 0  # oldest turns left out so that the prompt fits
    truncated: bool = False  # the one remaining turn lost its beginning as well


def fit_chat(tokenizer: Encoding, messages: Sequence[dict[str, str]], max_tokens: int) -> ChatPrompt:
    """The generation prompt of `messages` in at most `max_tokens` tokens.

    Drops the oldest turns first (a leading system message is kept while anything else can go);
    if the newest turn alone is still too long, keeps the end of its text.
    """
    generation_prompt = 1
    if max_tokens < 3 + generation_prompt:
        raise DataError(f"prompt budget {max_tokens} tokens: expected at least {3 + generation_prompt} "
                        "(lower max new tokens)")
    if not messages:
        raise DataError("a chat prompt needs at least one message")
    segments = [message_ids(tokenizer, m) for m in messages]
    system = segments[:1] if messages[0].get("role") == "system" and len(segments) > 1 else []
    turns = segments[len(system):]
    dropped = 0

    def size() -> int:
        return sum(map(len, system + turns)) + generation_prompt

    while size() > max_tokens and len(system) + len(turns) > 1:
        if len(turns) > 1:
            turns.pop(0)
        else:
            system = []
        dropped += 1
    truncated = size() > max_tokens
    if truncated:  # one turn left and too long alone: keep the end of its text
        (only,) = system + turns
        keep = max_tokens - generation_prompt - 2
        system, turns = [], [[only[0], *only[1:-1][-keep:], only[-1]]]
    ids = [token for segment in system + turns for token in segment]
    return ChatPrompt([*ids, special_id(tokenizer, ASSISTANT)], dropped, truncated)


# ---------------------------------------------------------------------------------------- routing


@contextlib.contextmanager
def recording_routing(layers: Sequence[tuple[int, MoE]]) -> Iterator[None]:
    """Turns `record_routing` on for the given MoE modules for the duration of the block."""
    for _, moe in layers:
        moe.record_routing, moe.last_expert_ids = True, None
    try:
        yield
    finally:
        for _, moe in layers:
            moe.record_routing = False


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
    `finish_reason` ("stop": an end marker, "length": max_new_tokens) describe it.

    `lock` serialises the model between replies generated in different threads: it is held for
    one decode step at a time (the forward pass, sampling and reading the routing), so replies
    interleave token by token and an abandoned reply holds nothing.
    """

    def __init__(self, model: DeepSeekForCausalLM, tokenizer: Encoding, prompt: ChatPrompt,
                 cfg: SamplingConfig, lock: threading.Lock | None = None, stop_ids: set[int] | None = None) -> None:
        self.model, self.tokenizer, self.prompt, self.cfg = model, tokenizer, prompt, cfg
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.stop_ids = reply_stop_ids(tokenizer) if stop_ids is None else stop_ids
        self.moe_layers = model.moe_layers(include_mtp=False)
        config = model.config
        self.routing = RoutingRecord([i for i, _ in self.moe_layers], config.n_routed_experts,
                                     config.num_experts_per_tok)
        self.text = ""
        self.finish_reason: str | None = None
        self.stats = DecodeStats()  # tokens and, with cfg.speculative, MTP drafts proposed and accepted
        self.seconds = 0.0  # from the start of generation to the newest token (prefill included)
        self._forward_routing: dict[int, torch.Tensor] = {}  # expert ids of the newest main forward, by layer

    @property
    def token_ids(self) -> list[int]:
        return self.routing.token_ids

    @property
    def tokens_per_second(self) -> float | None:
        return len(self.routing) / self.seconds if self.seconds > 0 else None

    def __iter__(self) -> Iterator[str]:
        text = TextStream(self.tokenizer)
        start = time.perf_counter()
        tokens = generate_ids(self.model, [self.prompt.ids], self.cfg, self.stop_ids, self.stats)
        try:
            while True:
                step = self._step(tokens)
                self.seconds = time.perf_counter() - start
                if step is None:
                    self.finish_reason = "length"
                    break
                token, experts = step
                self.routing.append(token, experts)
                if token in self.stop_ids:
                    self.finish_reason = "stop"
                    break
                piece = text.push(token)
                if piece:
                    self.text += piece
                    yield piece
            tail = text.flush()
            if tail:
                self.text += tail
                yield tail
        finally:
            tokens.close()

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


def generate_reply(model: DeepSeekForCausalLM, tokenizer: Encoding, messages: Sequence[dict[str, str]],
                   cfg: SamplingConfig, lock: threading.Lock | None = None) -> ReplyStream:
    """A `ReplyStream` for the conversation, its prompt fitted into the model's context
    (`max_position_embeddings - max_new_tokens` tokens)."""
    prompt = fit_chat(tokenizer, messages, prompt_budget(model, cfg.max_new_tokens))
    return ReplyStream(model, tokenizer, prompt, cfg, lock)


def generate_continuation(model: DeepSeekForCausalLM, tokenizer: Encoding, text: str, cfg: SamplingConfig,
                          lock: threading.Lock | None = None) -> ReplyStream:
    """What a base model is good for: a `ReplyStream` continuing `text` as a document (no role markers; the end
    of an overlong text is kept), ending at `<|endoftext|>`."""
    ids = tokenizer.encode_ordinary(text)[-prompt_budget(model, cfg.max_new_tokens):]
    if not ids:
        raise DataError("empty prompt: type some text for the model to continue")
    return ReplyStream(model, tokenizer, ChatPrompt(ids), cfg, lock, stop_ids={special_id(tokenizer, ENDOFTEXT)})


def is_chat_model(info: dict) -> bool:
    """Whether a checkpoint's training facts say it was fine-tuned on conversations."""
    return bool(info.get("chat"))


def prompt_budget(model: DeepSeekForCausalLM, max_new_tokens: int) -> int:
    """Tokens left for the prompt when `max_new_tokens` must fit in the model's context."""
    context = model.config.max_position_embeddings
    if not 1 <= max_new_tokens < context:
        raise DataError(f"max new tokens {max_new_tokens}: expected 1 .. {context - 1} "
                        f"(the model's context is {context} tokens)")
    return context - max_new_tokens


# ----------------------------------------------------------------- shared by app.py and sample.py


def load_chat_model(path: str | Path | None, runs_dir: str | Path = "runs") -> LoadedModel:
    """`load_for_inference(path)`, or of the newest complete checkpoint under `runs_dir` when `path` is
    None (CheckpointError when there is none)."""
    if path is None:
        path = find_newest_checkpoint(runs_dir)
        if path is None:
            raise CheckpointError(f"no complete checkpoint under {Path(runs_dir).resolve()}/; {TRAIN_HINT}, "
                                  "or pass --checkpoint PATH")
    return load_for_inference(path)
