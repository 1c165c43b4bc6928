"""The chat template: a conversation as token ids (and loss mask), the prompt the model answers, the ids that end
a reply. Torch-free: data_prep renders training conversations with it, the sampler and the app build prompts
with it, and export writes its Jinja form.

    <|system|>text<|end|><|user|>text<|end|><|assistant|>text<|end|>...<|user|>text<|end|><|assistant|>

The role markers are the tokenizer's special tokens (`gpt_moe.data.tokenizer`: `<|system|>`, `<|user|>`,
`<|assistant|>`, `<|end|>`), their ids read from the tokenizer, and every message's text goes through
`encode_ordinary`, so text that spells a marker ("<|user|>") stays plain text and can never open a turn. A reply
ends at `<|end|>` or `<|endoftext|>`; any other role marker also ends it (the model began a new turn).

A published model's tokenizer (`gpt_moe.data.published_tokenizer.PublishedTokenizer`) brings its own template: every
function here then renders with it (`gpt_moe.data.model_chat_template`: transformers' semantics, the loss mask from
`{% generation %}` or from prefixes proved stable), prompts end with its generation prompt, and replies end at its
end-of-turn and EOS tokens. Our markers are never added to its vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt_moe.data.model_chat_template import ModelChatTemplate
from gpt_moe.data.published_tokenizer import PublishedTokenizer
from gpt_moe.data.tokenizer import ASSISTANT, END, ENDOFTEXT, SYSTEM, USER
from gpt_moe.errors import DataError

if TYPE_CHECKING:
    from gpt_moe.data.tokenizer_format import Tokenizer

ROLE_MARKERS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    f"{{{{ '{ASSISTANT}' }}}}{{% generation %}}{{{{ message['content'] + '{END}' }}}}{{% endgeneration %}}"
    f"{{% else %}}{{{{ '<|' + message['role'] + '|>' + message['content'] + '{END}' }}}}{{% endif %}}"
    f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{ASSISTANT}' }}}}{{% endif %}}")
"""The same template for transformers' `apply_chat_template` (written into exported tokenizer configs); the
`{% generation %}` block marks what `render_conversation` trains on, so `return_assistant_tokens_mask=True`
gives our loss mask (what TRL's `assistant_only_loss` reads). Its sha256 is the template's identity in chat data
manifests: a change to this string makes prepared chat data refuse to resume."""


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of special token `token` (a role marker or `<|endoftext|>`); DataError if absent."""
    if token not in tokenizer.special_tokens_set:
        raise DataError(f"tokenizer {tokenizer.name!r} has no special token {token}; "
                        "hint: tokenizers made by gpt_moe.data.tokenizer carry the chat markers")
    return tokenizer.encode_single_token(token)


def model_template(tokenizer: Tokenizer) -> ModelChatTemplate | None:
    """The published model's own chat template; None for ours (DataError for a published model that has none)."""
    if not isinstance(tokenizer, PublishedTokenizer):
        return None
    if tokenizer.chat is None:
        raise DataError(f"tokenizer {tokenizer.name!r} has no chat template (no chat_template.jinja, no chat_template "
                        "in tokenizer_config.json); hint: add the model's template to its directory")
    return tokenizer.chat


def template_sha256(tokenizer: Tokenizer | None = None) -> str:
    """The identity of the chat template conversations are rendered with: sha256 of its Jinja form (ours, for any
    tokenizer of ours: `JINJA_TEMPLATE`; a published model's: its own)."""
    template = model_template(tokenizer) if tokenizer is not None else None
    return template.sha256 if template is not None else hashlib.sha256(JINJA_TEMPLATE.encode()).hexdigest()


def checked_message(message: dict[str, str]) -> dict[str, str]:
    """`message` when its role is system, user or assistant and its content a string; DataError otherwise."""
    role = message.get("role")
    if role not in ROLE_MARKERS:
        raise DataError(f"chat message role {role!r}: expected one of {', '.join(ROLE_MARKERS)}")
    content = message.get("content", "")
    if not isinstance(content, str):
        raise DataError(f"chat message content: expected a string, got {type(content).__name__}")
    return message


def message_ids(tokenizer: Tokenizer, message: dict[str, str]) -> list[int]:
    """One turn of our template: [role marker] + encode_ordinary(content) + [<|end|>]."""
    checked_message(message)
    return [special_id(tokenizer, ROLE_MARKERS[message["role"]]),
            *tokenizer.encode_ordinary(message.get("content", "")), special_id(tokenizer, END)]


def format_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation (list of {"role", "content"}), ending with `<|assistant|>` when
    `add_generation_prompt` (the model writes the reply next)."""
    template = model_template(tokenizer)
    if template is not None:
        return template.ids([checked_message(m) for m in messages], add_generation_prompt)
    ids = [token for message in messages for token in message_ids(tokenizer, message)]
    if add_generation_prompt:
        ids.append(special_id(tokenizer, ASSISTANT))
    return ids


def render_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a whole conversation for fine-tuning: the ids of `format_chat(..., False)` and,
    per id, 1 where the model is trained to produce it -- every assistant message's text and its closing
    `<|end|>` -- and 0 for system and user turns and for every role marker (the marker that opens an
    assistant turn is part of the prompt: at inference the template writes it). A published model's template:
    its own ids, and the mask over each assistant message and the end of its turn (`ModelChatTemplate.render`)."""
    template = model_template(tokenizer)
    if template is not None:
        return template.render([checked_message(m) for m in messages])
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        turn = message_ids(tokenizer, message)
        trained = 1 if message.get("role") == "assistant" else 0
        ids += turn
        mask += [0] + [trained] * (len(turn) - 1)
    return ids, mask


def reply_stop_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens that end a reply: `<|end|>`, `<|endoftext|>` and the markers that open another turn; for a published
    model its end-of-turn and EOS tokens."""
    if isinstance(tokenizer, PublishedTokenizer):
        return end_of_turn_ids(tokenizer) | {tokenizer.eot}
    return {special_id(tokenizer, token) for token in (END, ENDOFTEXT, *ROLE_MARKERS.values())}


def end_of_turn_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokens a finished reply ends with: `<|end|>`; a published model's end of an assistant turn (its EOS
    when the template closes turns with no special token of its own)."""
    if isinstance(tokenizer, PublishedTokenizer):
        return (tokenizer.chat.end_of_turn_ids() if tokenizer.chat is not None else set()) or {tokenizer.eot}
    return {special_id(tokenizer, END)}


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """The token that ends a document: `<|endoftext|>`, a published model's EOS."""
    return tokenizer.eot if isinstance(tokenizer, PublishedTokenizer) else special_id(tokenizer, ENDOFTEXT)


@dataclass
class ChatPrompt:
    """The ids the model continues; for a conversation, how it was fitted into the context."""

    ids: list[int]
    dropped_messages: int = 0  # oldest turns left out so that the prompt fits
    truncated: bool = False  # the one remaining turn lost its beginning as well


def fit_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], max_tokens: int) -> ChatPrompt:
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
    template = model_template(tokenizer)
    if template is not None:
        return ChatPrompt(*template.fit([checked_message(m) for m in messages], max_tokens))
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


def continuation_prompt(tokenizer: Tokenizer, text: str, max_tokens: int) -> ChatPrompt:
    """What a base model is good for: `text` as a document to continue (no role markers; a published model's
    document prefix, e.g. its BOS, first), the end of an overlong text kept."""
    prefix = list(tokenizer.document_prefix) if isinstance(tokenizer, PublishedTokenizer) else []
    ids = tokenizer.encode_ordinary(text)[-max(max_tokens - len(prefix), 1):]
    if not ids:
        raise DataError("empty prompt: type some text for the model to continue")
    return ChatPrompt(prefix + ids)


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt when `max_new_tokens` must fit in a context of `context` tokens."""
    if not 1 <= max_new_tokens < context:
        raise DataError(f"max new tokens {max_new_tokens}: expected 1 .. {context - 1} "
                        f"(the model's context is {context} tokens)")
    return context - max_new_tokens
