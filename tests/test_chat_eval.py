"""The chat evaluation (`launch/eval.py`): its greedy replies and counts against a naive loop of full forwards."""

from __future__ import annotations

import torch

from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.data.chat_template import format_chat, reply_stop_ids, special_id
from gpt_moe.data.tokenizer import END
from gpt_moe.serve.chat_eval import reply_statistics
from gpt_moe.train.evaluator import greedy_uncached

ITEMS = [([{"role": "user", "content": "What does add do?"}], "Adds two numbers.", "doc"),
         ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b): ..."}], "add",
          "name"),
         ([{"role": "user", "content": "The quick brown fox"}], "jumps", "name")]


def naive_reply(model, tokenizer, messages, max_new_tokens: int) -> tuple[str, bool]:
    """(text before the first stop token, whether that token was <|end|>) from full forwards, one token at a time."""
    prompt = format_chat(tokenizer, messages)
    ids = greedy_uncached(model, torch.tensor([prompt]), max_new_tokens, vocab_limit=tokenizer.n_vocab)[0]
    new = ids[len(prompt):].tolist()
    stops = reply_stop_ids(tokenizer)
    cut = next((i for i, token in enumerate(new) if token in stops), len(new))
    return tokenizer.decode(new[:cut]), cut < len(new) and new[cut] == special_id(tokenizer, END)


def test_reply_statistics_count_what_a_naive_greedy_loop_replies(tiny_checkpoint):
    loaded = load_for_inference(tiny_checkpoint)
    expected = [naive_reply(loaded.model, loaded.tokenizer, messages, 12) for messages, _, _ in ITEMS]
    items = [*ITEMS, (ITEMS[2][0], expected[2][0], "parameters")]  # a reference the model does reply: exact
    stats = reply_statistics(loaded.model, loaded.tokenizer, items, max_new_tokens=12)
    assert dict(stats.asked) == {"doc": 1, "name": 2, "parameters": 1} and stats.exact["parameters"] == 1
    assert sum(stats.ended.values()) == sum(ended for _, ended in expected) + expected[2][1]
    assert stats.exact["name"] + stats.exact["doc"] == sum(
        text.strip() == answer for (text, _), (_, answer, _) in zip(expected, ITEMS))
    assert [reply for _, reply, _ in stats.examples] == [text for text, _ in expected]
