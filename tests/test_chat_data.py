"""Packed chat batches against the conversations they were made from (rendered independently here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_moe.data.chat_batches import ChatBatches, ChatValBatches, PackedRows, pack_best_fit
from gpt_moe.data.chat_template import render_conversation
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.tokenizer import load_saved_tokenizer
from gpt_moe.model.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parent.parent


def conversation(i: int) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": f"question {i} " * (1 + i % 5)},
             {"role": "assistant", "content": f"answer {i} " * (1 + i % 7)}]
    if i % 3 == 0:
        turns = [{"role": "system", "content": "Be brief."}, *turns,
                 {"role": "user", "content": "more?"}, {"role": "assistant", "content": "no"}]
    return turns


@pytest.fixture(scope="module")
def chat_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chatdata")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(60)))
    out = root / "chat"
    subprocess.run([sys.executable, "-m", "data_prep", "--format", "chat", "--source", str(rows),
                    "--tokenizer-from", str(tiny_checkpoint), "--val-fraction", "0.2", "--out", str(out),
                    "--no-progress", "--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return out


def test_best_fit_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    rows = pack_best_fit(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    lower_bound = -(-int(lengths.sum()) // 128)
    assert len(rows) <= lower_bound * 1.05 + 1  # best fit decreasing is close to the bound on such sizes


def test_packed_rows_hold_each_conversation_with_its_own_positions_labels_and_segment(chat_dir):
    shards = TokenShards(chat_dir)
    tokenizer = load_saved_tokenizer(shards.manifest.tokenizer, chat_dir)
    expected = {}
    for i in range(60):
        ids, mask = render_conversation(tokenizer, conversation(i))
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]  # EOT untrained
        expected[tuple(ids)] = labels
    rows = PackedRows(shards, "train", 256)
    seen = 0
    for r in range(len(rows)):
        ids, labels, positions, segments = rows.row(r)
        for segment in np.unique(segments):
            at = np.flatnonzero(segments == segment)
            if segment == len(rows.rows[r]):  # padding
                assert (labels[at] == IGNORE_INDEX).all() and at[-1] == 255
                continue
            assert (positions[at] == np.arange(len(at))).all()
            key = tuple(ids[at].tolist())
            assert key in expected and labels[at].tolist() == expected[key]
            seen += 1
    assert seen == len(rows.conversations) and 0 < seen < 60  # the others are the validation split


def test_batches_resume_exactly_and_ranks_never_share_a_row(chat_dir):
    shards = TokenShards(chat_dir)
    first = ChatBatches(shards, 256, 2, rank=0, world_size=2, seed=3)
    second = ChatBatches(shards, 256, 2, rank=1, world_size=2, seed=3)
    epoch = len(first.rows)
    used = [first.row_ids(p).tolist() + second.row_ids(p).tolist() for p in range(0, epoch - epoch % 4, 4)]
    flat = [r for step in used for r in step]
    assert len(flat) == len(set(flat))
    first.next_batch()
    resumed = ChatBatches(shards, 256, 2, rank=0, world_size=2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.next_batch().input_ids, first.next_batch().input_ids)
    val = list(ChatValBatches(shards, 256, 1))
    assert val and all(batch.trained_tokens()[0] > 0 for batch in val)
