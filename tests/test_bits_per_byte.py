"""Bits per byte (`gpt_moe.data.bits_per_byte`): the model's per-token losses and the byte counts against a naive
loop over positions of full-logit forwards, with special tokens and masked-out positions left out."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CORPUS, prepare_chat, shrunk_tiny

from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.data.bits_per_byte import bits_per_byte, nats_and_bytes, token_byte_lengths
from gpt_moe.data.chat_batches import PackedRows
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.tokenizer import END, ENDOFTEXT, train_bpe
from gpt_moe.data.validation import validation_totals
from gpt_moe.model.loss import IGNORE_INDEX
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.chat_eval import held_out_loss

@torch.no_grad()
def naive_bits_per_byte(model, tokenizer, model_inputs: dict) -> tuple[float, float, int]:
    """(sum of nats, sum of UTF-8 bytes, positions counted): one position at a time from the full logits, a position
    counted when its label is neither -100 nor a special token; bytes from the tokenizer's own decoding."""
    labels = model_inputs["labels"]
    logits = model(**{k: v for k, v in model_inputs.items() if k != "labels"}).logits.double()
    special = {tokenizer.encode_single_token(text) for text in tokenizer.special_tokens_set}
    nats, count_bytes, counted = 0.0, 0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            label = int(labels[row, t])
            if label == IGNORE_INDEX or label in special:
                continue
            nats -= torch.log_softmax(logits[row, t], dim=-1)[label].item()
            count_bytes += len(tokenizer.decode_single_token_bytes(label))
            counted += 1
    return nats, count_bytes, counted


def test_byte_lengths_add_up_to_the_texts_utf8_bytes_and_special_tokens_count_none():
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    lengths = token_byte_lengths(tokenizer, vocab_size=tokenizer.n_vocab + 7)
    assert lengths.shape == (tokenizer.n_vocab + 7,) and lengths[tokenizer.n_vocab:].eq(0).all()
    for text in tokenizer.special_tokens_set:
        assert lengths[tokenizer.encode_single_token(text)] == 0
    for text in ("Ünïcödé and emoji 🙂: def add(a, b)", CORPUS[:500]):
        assert lengths[tokenizer.encode_ordinary(text)].sum() == len(text.encode("utf-8"))


def test_bits_per_byte_equals_a_naive_per_token_loop_leaving_out_special_and_masked_tokens():
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    eot, end = tokenizer.encode_single_token(ENDOFTEXT), tokenizer.encode_single_token(END)
    ids = (tokenizer.encode_ordinary(CORPUS[:300]) + [eot] + tokenizer.encode_ordinary("Ünïcödé 🙂 too") + [end]
           + tokenizer.encode_ordinary(CORPUS[900:1200]))
    seq = (len(ids) - 1) // 2
    rows = torch.tensor([ids[:seq + 1], ids[seq:2 * seq + 1]])
    input_ids, labels = rows[:, :-1], rows[:, 1:].clone()
    labels[1, :17] = IGNORE_INDEX  # a masked-out prompt
    assert {eot, end} <= set(labels.flatten().tolist())
    model = DeepSeekForCausalLM(shrunk_tiny(vocab_size=tokenizer.n_vocab + 5), seed=1).eval()  # padded vocabulary
    out = model(input_ids, labels=labels, per_token_nats=True)
    totals = nats_and_bytes(out.token_nats, labels, token_byte_lengths(tokenizer, model.config.vocab_size))
    nats, count_bytes, _ = naive_bits_per_byte(model, tokenizer, {"input_ids": input_ids, "labels": labels})
    assert totals[1].item() == count_bytes
    assert totals[0].item() == pytest.approx(nats, rel=1e-5)
    assert bits_per_byte(totals) == pytest.approx(nats / (math.log(2) * count_bytes), rel=1e-5)
    with torch.no_grad():  # the per-token path's mean is the training path's loss
        assert torch.allclose(out.lm_loss, model(input_ids, labels=labels).lm_loss, rtol=1e-5)


def test_held_out_bits_per_byte_of_conversations_equal_the_naive_loop(tiny_checkpoint, tmp_path):
    """`launch/eval.py`'s held-out figures: only assistant tokens count, and of those <|end|> adds no bytes; the
    end-of-turn probability is the mean softmax probability of <|end|> where the reference ends the turn."""
    data = prepare_chat(tiny_checkpoint, tmp_path / "chat", [(f"What is {i} + {i}?", f"It is {2 * i}. 🙂")
                                                              for i in range(40)], val_fraction=0.2)
    loaded, shards = load_for_inference(tiny_checkpoint), TokenShards(data)
    result = held_out_loss(loaded.model, shards, seq_len=128, batch=3)
    packed = PackedRows(shards, "val", 128, leave_out_longer=True)
    nats, count_bytes, counted, end_probs = 0.0, 0, 0, []
    end = loaded.tokenizer.encode_single_token(END)
    batches = [packed.batch(torch.arange(start, min(start + 3, len(packed))).numpy())
               for start in range(0, len(packed), 3)]
    for batch in batches:
        n, b, c = naive_bits_per_byte(loaded.model, loaded.tokenizer, batch.model_inputs())
        nats, count_bytes, counted = nats + n, count_bytes + b, counted + c
        assert c < batch.trained_tokens()[0]  # <|end|> is trained, but is no text
        with torch.no_grad():
            probs = torch.softmax(loaded.model(batch.input_ids, position_ids=batch.position_ids,
                                               segment_ids=batch.segment_ids).logits.double(), dim=-1)
        end_probs += [probs[row, t, end].item() for row, t in (batch.labels == end).nonzero().tolist()]
    assert result.bits_per_byte == pytest.approx(nats / (math.log(2) * count_bytes), rel=1e-5)
    lengths = token_byte_lengths(loaded.tokenizer, loaded.model.config.vocab_size)
    figures = validation_totals(loaded.model, batches, torch.device("cpu"), lengths, [end]).figures()
    assert len(end_probs) == sum(len(row) for row in packed.rows)  # one end of turn per one-turn conversation
    assert figures["chat_end_prob"] == pytest.approx(sum(end_probs) / len(end_probs), rel=1e-5)
    assert figures["val_loss"] == result.loss
