"""How well a model chats, on held-out conversations: assistant-token loss, replies that end, exact answers.

    held_out_loss(model, shards)            # mean loss over the assistant tokens of the "val" split, bits per byte
    reply_statistics(model, tokenizer, items, max_new_tokens)   # greedy replies to held-out questions

`items` are (messages ending with a user question, reference answer, kind) triples, for example
`data_prep.builtin_chat.heldout_eval_items()`. A reply "ends" when the model writes `<|end|>` (a published model's
end of turn) within the token limit; it is "exact" when its text, stripped, equals the reference answer. Both are
counted per kind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt_moe.data.bits_per_byte import token_byte_lengths
from gpt_moe.data.chat_batches import PackedRows
from gpt_moe.data.chat_template import end_of_turn_ids
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.validation import validation_totals
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.chat import generate_reply
from gpt_moe.serve.generate import SamplingConfig


@dataclass(frozen=True)
class HeldOutLoss:
    loss: float  # nats per trained token (NaN: none)
    bits_per_byte: float  # of the same tokens, special tokens left out (`gpt_moe.data.bits_per_byte`)
    left_out: int  # conversations longer than the context


def held_out_loss(model: DeepSeekForCausalLM, shards: TokenShards, seq_len: int = 512, batch: int = 8) -> HeldOutLoss:
    """Mean cross-entropy over every trained token of the validation split and its bits per byte
    (`gpt_moe.data.validation`, as a training run's validation): conversations packed as in training, `batch` rows
    at a time, every row however few there are; those longer than `seq_len` (the model's context) are left out and
    counted."""
    packed = PackedRows(shards, "val", seq_len, leave_out_longer=True)
    batches = (packed.batch(np.arange(start, min(start + batch, len(packed))))
               for start in range(0, len(packed), batch))
    lengths = token_byte_lengths(shards.tokenizer(), model.config.vocab_size)
    figures = validation_totals(model, batches, model.lm_head.weight.device, lengths).figures()
    return HeldOutLoss(figures["val_loss"], figures["val_bpb"], packed.left_out)


@dataclass
class ReplyStatistics:
    """Counts per question kind: asked, replies that ended with <|end|> (the end of a turn), replies equal to the
    reference."""

    asked: Counter = field(default_factory=Counter)
    ended: Counter = field(default_factory=Counter)
    exact: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, reply, reference)

    def rate(self, counter: Counter, kinds: Iterable[str] | None = None) -> float:
        kinds = list(self.asked) if kinds is None else list(kinds)
        asked = sum(self.asked[k] for k in kinds)
        return sum(counter[k] for k in kinds) / asked if asked else float("nan")


@torch.no_grad()
def reply_statistics(model: DeepSeekForCausalLM, tokenizer, items: Iterable[tuple[Sequence[dict], str, str]],
                     max_new_tokens: int = 64) -> ReplyStatistics:
    """Greedy replies to each item's messages, through the app's own reply loop (`generate_reply`)."""
    stats, greedy = ReplyStatistics(), SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    ends = end_of_turn_ids(tokenizer)
    for messages, answer, kind in items:
        reply = generate_reply(model, tokenizer, messages, greedy)
        text = "".join(reply)
        stats.asked[kind] += 1
        stats.ended[kind] += reply.finish_reason == "stop" and reply.token_ids[-1] in ends
        stats.exact[kind] += text.strip() == answer.strip()
        if len(stats.examples) < 3:
            stats.examples.append((messages[-1]["content"], text, answer))
    return stats


def chat_figures(held_out: HeldOutLoss, stats: ReplyStatistics, in_context_kinds: Iterable[str]) -> dict[str, float]:
    """The chat figures of an evaluation record (`gpt_moe.checkpoint.evaluation.FIGURES`)."""
    return {"held_out_assistant_loss": held_out.loss, "held_out_assistant_bpb": held_out.bits_per_byte,
            "chat_replies_ended": stats.rate(stats.ended),
            "chat_exact_in_context": stats.rate(stats.exact, in_context_kinds)}
