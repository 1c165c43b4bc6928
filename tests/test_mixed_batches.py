"""--mix-pretrain's rows: pretraining windows beside packed conversations, read back from the shards, resumed
exactly, and refused in one line when the text cannot be mixed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt_moe.data.chat_batches import ChatBatches
from gpt_moe.data.mixed_batches import MixedBatches, text_rows
from gpt_moe.data.shards import TokenShards
from gpt_moe.errors import ConfigError, DataError
from gpt_moe.model.loss import IGNORE_INDEX

SEQ_LEN, MICRO_BATCH, TEXT_ROWS = 256, 6, 2


@pytest.mark.parametrize("fraction, micro_batch, rows", [(0.25, 8, 2), (0.25, 2, 1), (0.1, 16, 2), (0.05, 4, 1),
                                                         (0.9, 4, 3), (0.5, 2, 1), (0.0, 8, 0)])
def test_text_rows_are_the_nearest_whole_number_leaving_both_kinds(fraction, micro_batch, rows):
    assert text_rows(fraction, micro_batch) == rows


@pytest.mark.parametrize("fraction, micro_batch", [(0.25, 1), (1.0, 8), (-0.1, 8)])
def test_text_rows_refuse_what_cannot_be_split(fraction, micro_batch):
    with pytest.raises(ConfigError, match="--m"):
        text_rows(fraction, micro_batch)


def windows_of(shards: TokenShards) -> set[tuple[int, ...]]:
    """Every training window (seq_len + 1 tokens starting at a multiple of seq_len, inside one shard)."""
    found = set()
    for tokens in shards.tokens("train"):
        for start in range(0, len(tokens) - SEQ_LEN, SEQ_LEN):
            found.add(tuple(int(t) for t in tokens[start:start + SEQ_LEN + 1]))
    return found


def test_text_rows_are_whole_training_windows_and_the_rest_the_conversations_rows(prepared_data, chat_data):
    text, chat = TokenShards(prepared_data), TokenShards(chat_data)
    mixed = MixedBatches(chat, text, SEQ_LEN, MICRO_BATCH, TEXT_ROWS, seed=7)
    alone = ChatBatches(chat, SEQ_LEN, MICRO_BATCH - TEXT_ROWS, seed=7)  # the same conversations, read alone
    windows = windows_of(text)
    seen = []
    for _ in range(3):
        batch, reference = mixed.next_batch(), alone.next_batch()
        assert batch.input_ids.shape == (MICRO_BATCH, SEQ_LEN)
        for row in range(TEXT_ROWS):
            ids, labels = batch.input_ids[row], batch.labels[row]
            assert torch.equal(ids[1:], labels[:-1]) and bool((labels != IGNORE_INDEX).all())  # every token trained
            window = tuple(ids.tolist()) + (int(labels[-1]),)
            assert window in windows
            seen.append(window)
            assert torch.equal(batch.position_ids[row], torch.arange(SEQ_LEN))
            assert bool((batch.segment_ids[row] == 0).all())  # one segment: plain causal attention
        for name in ("input_ids", "labels", "position_ids", "segment_ids"):
            assert torch.equal(getattr(batch, name)[TEXT_ROWS:], getattr(reference, name))
    assert len(set(seen)) == len(seen)  # no window twice within an epoch
    trained, _ = batch.trained_tokens()
    assert trained == TEXT_ROWS * SEQ_LEN + int((reference.labels != IGNORE_INDEX).sum())


def test_a_saved_state_resumes_both_readers_exactly(prepared_data, chat_data):
    text, chat = TokenShards(prepared_data), TokenShards(chat_data)
    going = MixedBatches(chat, text, SEQ_LEN, MICRO_BATCH, TEXT_ROWS, seed=3)
    for _ in range(2):
        going.next_batch()
    state = json.loads(json.dumps(going.state_dict()))  # as a checkpoint stores it
    resumed = MixedBatches(chat, text, SEQ_LEN, MICRO_BATCH, TEXT_ROWS, seed=3)
    resumed.load_state_dict(state)
    a, b = going.next_batch(), resumed.next_batch()
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    with pytest.raises(DataError, match="resume it with --mix-pretrain > 0"):
        ChatBatches(chat, SEQ_LEN, MICRO_BATCH, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="trained without --mix-pretrain"):
        resumed.load_state_dict(ChatBatches(chat, SEQ_LEN, MICRO_BATCH, seed=3).state_dict())


def test_conversations_or_another_tokenizer_are_refused_as_text(prepared_data, chat_data, tmp_path):
    chat = TokenShards(chat_data)
    with pytest.raises(DataError, match="must be pretraining text, found 'chat'"):
        MixedBatches(chat, chat, SEQ_LEN, MICRO_BATCH, TEXT_ROWS)
    other = tmp_path / "other"
    shutil.copytree(prepared_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="tokenized with"):
        MixedBatches(chat, TokenShards(other), SEQ_LEN, MICRO_BATCH, TEXT_ROWS)
