"""Fine-tuning batches with pretraining text mixed in (`--mix-pretrain F`): what keeps a chat fine-tune from
forgetting what the base model knew.

Each micro-batch of B rows holds `text_rows(F, B)` = round(F * B) rows of pretraining text and the rest packed
conversations (`gpt_moe.data.chat_batches`). A text row is a window of the base model's training data
(`gpt_moe.data.shards.TrainBatches`: seq_len + 1 tokens, the same shuffled global order) trained on every token,
positions 0 .. seq_len - 1 and one attention segment: text is packed apart from conversations, never into the same
row. The two readers keep their own global positions, so a saved state resumes both exactly on any layout.

Shapes: `next_batch()` -> PackedBatch [B, seq_len]: the text rows first, then the conversation rows.
"""

from __future__ import annotations

import torch

from gpt_moe.data.chat_batches import ChatBatches, PackedBatch
from gpt_moe.data.shards import TokenShards, TrainBatches
from gpt_moe.errors import ConfigError, DataError


def text_rows(fraction: float, micro_batch: int) -> int:
    """Rows of pretraining text in a micro-batch of `micro_batch` rows for `--mix-pretrain fraction`: the nearest
    whole number, at least one and leaving at least one conversation row (ConfigError when that is impossible)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"--mix-pretrain {fraction}: expected a fraction in [0, 1)")
    if fraction == 0:
        return 0
    rows = min(max(round(fraction * micro_batch), 1), micro_batch - 1)
    if rows < 1:
        raise ConfigError(f"--mix-pretrain {fraction} with --micro-batch {micro_batch}: a micro-batch of one row "
                          "cannot hold text and conversations; raise --micro-batch to 2 or more")
    return rows


def check_mix_data(text: TokenShards, chat: TokenShards) -> None:
    """DataError unless `text` is text data with a training split, tokenized like the conversations `chat`."""
    if text.content != "text":
        raise DataError(f"{text.directory}: --mix-data must be pretraining text, found {text.content!r} data; give "
                        "the directory the base model was pretrained on")
    if not text.has_split("train"):
        raise DataError(f"{text.directory}: --mix-data has no training split to draw text rows from")
    ours, theirs = text.manifest.tokenizer, chat.manifest.tokenizer
    if ours.sha256 != theirs.sha256:
        raise DataError(f"{text.directory}: --mix-data is tokenized with {ours.name} ({ours.sha256[:12]}...), the "
                        f"conversations {chat.directory} with {theirs.name} ({theirs.sha256[:12]}...); give text "
                        "prepared with the base model's tokenizer")


class MixedBatches:
    """Fine-tuning rows for one data-parallel rank: `text_rows` pretraining windows and `micro_batch - text_rows`
    packed conversation rows per micro-batch (see the module docstring)."""

    def __init__(self, chat: TokenShards, text: TokenShards, seq_len: int, micro_batch: int, text_rows: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if not 0 < text_rows < micro_batch:
            raise ConfigError(f"{text_rows} text rows in a micro-batch of {micro_batch}: expected 1 .. "
                              f"{micro_batch - 1}")
        check_mix_data(text, chat)
        self.conversations = ChatBatches(chat, seq_len, micro_batch - text_rows, rank, world_size, seed)
        self.text = TrainBatches(text, seq_len, text_rows, rank, world_size, seed)
        self.text_rows, self.seq_len = text_rows, seq_len

    def next_batch(self) -> PackedBatch:
        """[micro_batch, seq_len]: the text rows (every label trained) on top of the conversation rows."""
        inputs, labels = self.text.next_batch()
        chat = self.conversations.next_batch()
        positions = torch.arange(self.seq_len, dtype=torch.int64).expand(self.text_rows, -1)
        segments = torch.zeros_like(inputs)
        return PackedBatch(*(torch.cat(pair) for pair in ((inputs, chat.input_ids), (labels, chat.labels),
                                                          (positions, chat.position_ids),
                                                          (segments, chat.segment_ids))))

    def state_dict(self) -> dict:
        return {"conversations": self.conversations.state_dict(), "text": self.text.state_dict(),
                "text_rows": self.text_rows, "text_data": str(self.text.windows.shards.directory)}

    def load_state_dict(self, state: dict) -> None:
        if "text" not in state:
            raise DataError("data loader state: the checkpoint was trained without --mix-pretrain; resume it "
                            "without --mix-pretrain (or --mix-pretrain 0)")
        self.conversations.load_state_dict(state["conversations"])
        self.text.load_state_dict(state["text"])

