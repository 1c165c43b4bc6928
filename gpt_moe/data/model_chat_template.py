"""A published model's own chat template (Jinja, as the model ships it), rendered with transformers' semantics: ids
and loss mask for fine-tuning, the generation prompt the model answers, the ids that end its reply. Torch-free.

Rendering follows transformers' `apply_chat_template` (tested against it): the same sandboxed Jinja environment
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII),
the template variables `messages`, `add_generation_prompt`, `tools`, `documents` and the named special tokens
(`bos_token`, `eos_token`, ...), then the rendered text tokenized with special tokens parsed. Jinja2 is the only
dependency (transformers is not needed at run time): it is all `apply_chat_template` uses to render.

The loss mask covers exactly each assistant message's tokens and the template's end of its turn:

- where the template marks them with `{% generation %} ... {% endgeneration %}`, every token overlapping a marked
  span (transformers' `return_assistant_tokens_mask=True`);
- otherwise derived from prefixes: assistant message i spans the ids that `messages[:i + 1]` rendered adds to
  `messages[:i]` rendered with the generation prompt, and is accepted only when it is a stable suffix: the
  generation prompt's ids begin the turn's ids, and the whole conversation's ids begin with the turn's ids (later
  turns do not re-render it). A template where it is not (DeepSeek-R1's opens a thinking block in the generation
  prompt that the rendered turn lacks) is refused in one line naming the turn.

As in transformers, text is rendered first and tokenized after, so text typed into a message that spells a special
token becomes that token (our own template keeps it text: `gpt_moe.data.chat_template`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from gpt_moe.errors import DataError, first_line

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)
PROBE = ({"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Bye."})
"""The conversation a template is proved on before any data is rendered with it (every role, two assistant turns)."""

Spans = list[tuple[int, int]]


def template_text(directory: Path, config: dict) -> str | None:
    """The model's chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string,
    or the entry named "default" of a list of {name, template}); None when it has none."""
    path = Path(directory) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = config.get("chat_template")
    if isinstance(value, list):
        value = next((entry.get("template") for entry in value
                      if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return value if isinstance(value, str) and value else None


class ModelChatTemplate:
    """The chat template of a published tokenizer (`PublishedTokenizer.chat`); `sha256` is its identity."""

    def __init__(self, tokenizer: Any, text: str):
        self.tokenizer, self.text = tokenizer, text
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        self.marks_generation = GENERATION_TAG.search(JINJA_COMMENT.sub("", text)) is not None
        self.where = f"chat template of {tokenizer.name}"
        self._end_of_turn: set[int] | None = None  # found once, by rendering a probe reply

    # -- rendering
    def render_text(self, messages: Sequence[dict], add_generation_prompt: bool) -> tuple[str, Spans]:
        """The rendered conversation and the character spans of its `{% generation %}` blocks."""
        template = _compiled(self.text, self.where)
        variables = {"messages": [_plain(m) for m in messages], "add_generation_prompt": add_generation_prompt,
                     "tools": None, "documents": None, **self.tokenizer.named_tokens}
        blocks: list[str] = []
        spans: Spans = []
        try:
            with _tracking(blocks, spans):
                for block in template.generate(**variables):
                    blocks.append(block)
        except Exception as e:  # noqa: BLE001 - the template's own error (raise_exception) or a Jinja error
            raise DataError(f"{self.where}: rendering fails ({type(e).__name__}: {first_line(e)})") from None
        return "".join(blocks), spans

    def ids(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        """`apply_chat_template(messages, add_generation_prompt=...)`'s ids."""
        return self.tokenizer.encode_with_special(self.render_text(messages, add_generation_prompt)[0])

    def render(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole conversation for fine-tuning (see the module docstring)."""
        if self.marks_generation:
            return self._generation_mask(messages)
        return self._prefix_mask(messages)

    def _generation_mask(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        text, spans = self.render_text(messages, False)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        mask, at = [0] * len(ids), 0
        for index, (start, end) in enumerate(offsets):  # as transformers: a token overlapping a span is trained
            while at < len(spans) and start >= spans[at][1]:
                at += 1
            if at == len(spans):
                break
            if end > spans[at][0]:
                mask[index] = 1
        return ids, mask

    def _prefix_mask(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        full = self.ids(messages, False)
        mask = [0] * len(full)
        for start, end in self.assistant_spans(messages, full):
            mask[start:end] = [1] * (end - start)
        return full, mask

    def assistant_spans(self, messages: Sequence[dict], full: list[int]) -> Iterator[tuple[int, int]]:
        """[start, end) in `full` (the conversation's ids) of each assistant message, proved stable."""
        turn = 0
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            turn += 1
            before, through = self.ids(messages[:i], True), self.ids(messages[:i + 1], False)
            if through[:len(before)] != before:
                why = "the generation prompt's tokens do not begin the rendered turn"
            elif full[:len(through)] != through:
                why = "the later turns render it (or what precedes it) differently"
            else:
                yield len(before), len(through)
                continue
            raise DataError(f"{self.where}: assistant turn {turn} (message {i + 1} of {len(messages)}) is not a "
                            f"stable suffix of the conversation: {why}, so the loss mask cannot be derived from "
                            "prefixes; hint: use a template that marks assistant text with {% generation %}")

    # -- serving
    def check(self) -> None:
        """Prove the template on `PROBE` (every role, two assistant turns): DataError (one line) when it fails."""
        ids, mask = self.render(PROBE)
        if not any(mask):
            raise DataError(f"{self.where}: marks no assistant token in a conversation with two assistant turns; "
                            "hint: its {% generation %} blocks must hold the assistant messages")

    def end_of_turn_ids(self) -> set[int]:
        """The special tokens that close an assistant turn (the last trained token of a probe reply, when special)."""
        if self._end_of_turn is None:
            messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
            ids, mask = self.render(messages)
            trained = [token for token, m in zip(ids, mask) if m]
            special = {self.tokenizer.encode_single_token(t) for t in self.tokenizer.special_tokens_set}
            self._end_of_turn = {trained[-1]} if trained and trained[-1] in special else set()
        return set(self._end_of_turn)

    def fit(self, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], int, bool]:
        """(generation prompt ids in at most `max_tokens`, oldest messages dropped, whether the one message left was
        cut): drops the oldest turns first (a leading system message is kept while anything else can go); if the
        newest alone is still too long, keeps the end of its text."""
        messages = list(messages)
        system = messages[:1] if messages[0].get("role") == "system" and len(messages) > 1 else []
        turns, dropped = messages[len(system):], 0
        ids = self.ids(system + turns, True)
        while len(ids) > max_tokens and len(system) + len(turns) > 1:
            if len(turns) > 1:
                turns.pop(0)
            else:
                system = []
            dropped += 1
            ids = self.ids(system + turns, True)
        if len(ids) <= max_tokens:
            return ids, dropped, False
        return self._cut(system + turns, ids, max_tokens), dropped, True

    def _cut(self, messages: list[dict], ids: list[int], max_tokens: int) -> list[int]:
        """The one message left, its text cut from the front until the prompt fits."""
        (only,) = messages
        content = self.tokenizer.encode_ordinary(only.get("content", ""))
        keep = len(content) - (len(ids) - max_tokens)
        while keep > 0:
            ids = self.ids([{**only, "content": self.tokenizer.decode(content[-keep:])}], True)
            if len(ids) <= max_tokens:
                return ids
            keep -= len(ids) - max_tokens
        raise DataError(f"prompt budget {max_tokens} tokens: the {self.where} alone needs more (lower max new tokens)")


def _plain(message: dict) -> dict:
    """A message as transformers hands it to a template: keys whose value is None dropped."""
    return {key: value for key, value in message.items() if value is not None}


# ------------------------------------------------------------------------------------ the Jinja environment
_TRACKING: contextvars.ContextVar[tuple[list[str], Spans] | None] = contextvars.ContextVar("generation_spans",
                                                                                           default=None)


@contextlib.contextmanager
def _tracking(blocks: list[str], spans: Spans) -> Iterator[None]:
    """Record the character spans of `{% generation %}` blocks rendered while the block runs."""
    token = _TRACKING.set((blocks, spans))
    try:
        yield
    finally:
        _TRACKING.reset(token)


@lru_cache(maxsize=8)
def _compiled(text: str, where: str) -> Any:
    """The template compiled in transformers' environment; DataError for a template Jinja cannot parse."""
    try:
        return _environment().from_string(text)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax error, in one line
        raise DataError(f"{where}: not a valid Jinja template ({type(e).__name__}: {first_line(e)})") from None


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The sandboxed environment transformers renders chat templates in (same options, globals and filters)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body and records where it lies."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            if (tracking := _TRACKING.get()) is not None:
                blocks, spans = tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return environment

