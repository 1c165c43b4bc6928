"""Fine-tuning batches from chat data: whole conversations packed into rows, the loss on trained tokens only.

A chat data directory (`python -m data_prep --format chat`) stores every conversation as its ids
(`gpt_moe.data.chat_template.render_conversation`) followed by `<|endoftext|>`, and beside each token shard a mask shard
saying which tokens the model is trained to produce. A conversation of n tokens (its end-of-text included)
gives n - 1 positions: inputs ids[:-1], labels ids[1:] where the mask is 1 and -100 elsewhere.

Packing: the conversations of a split are placed best-fit-decreasing into rows of `seq_len` positions
(never cut: data_prep refuses conversations longer than its --max-seq-len, and a longer one than the
row is refused here), the rows are padded at their end only, and each epoch shuffles the rows with
(seed, epoch). In a row, positions restart at 0 for each conversation and `segment_ids` number its
conversations, so that attention stays inside each one (`gpt_moe.model.model.packed_causal_mask`). Padding is
its own segment with labels -100.

Reading follows `gpt_moe.data.shards.TrainBatches`: one global row position g counts the rows all ranks have
consumed; rank r of W with micro batch B reads rows g + r*B .. g + r*B + B - 1; a saved g resumes exactly.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpt_moe.data.manifest import CONVERSATION_END
from gpt_moe.data.shards import TokenShards
from gpt_moe.errors import DataError
from gpt_moe.model.loss import IGNORE_INDEX


@dataclass(frozen=True)
class PackedBatch:
    """[micro_batch, seq_len] each: token ids, labels (-100: not trained), positions, segment ids."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    @classmethod
    def stack(cls, rows: Sequence[tuple[np.ndarray, ...]]) -> PackedBatch:
        """The batch of rows, each (input ids, labels, positions, segment ids) as `fill_row` gives them."""
        return cls(*(torch.from_numpy(np.stack(column)) for column in zip(*rows)))

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.labels, self.position_ids,
                                                    self.segment_ids)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "segment_ids": self.segment_ids}

    def trained_tokens(self) -> tuple[int, int]:
        """(positions whose next token is trained, positions whose token after next is trained within the same
        conversation): what the language-model loss and the MTP loss average over (see the model's forward)."""
        trained = self.labels != IGNORE_INDEX
        same = self.segment_ids[:, 1:] == self.segment_ids[:, :-1]
        return int(trained.sum()), int((trained[:, 1:] & same).sum())


def fill_row(pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[np.ndarray, ...]:
    """(input ids, labels, positions, segment ids), each int64 [seq_len]: the pieces (inputs, labels of one sequence,
    n positions each, n in all at most seq_len) one after the other, positions restarting at 0 and a segment each;
    the rest is padding, a segment of its own with nothing trained."""
    ids, labels = np.zeros(seq_len, np.int64), np.full(seq_len, IGNORE_INDEX, np.int64)
    positions, segments = np.zeros(seq_len, np.int64), np.zeros(seq_len, np.int64)
    at = 0
    for segment, (inputs, targets) in enumerate(pieces):
        n = len(inputs)
        ids[at:at + n], labels[at:at + n] = inputs, targets
        positions[at:at + n] = np.arange(n)
        segments[at:at + n] = segment
        at += n
    segments[at:] = len(pieces)
    positions[at:] = np.arange(seq_len - at)
    return ids, labels, positions, segments


def pack_best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, best fit decreasing: each item, longest
    first, goes into the fullest bin it still fits in. Deterministic (ties by index)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for item in sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i)):
        size = int(lengths[item])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([item])
            room, row = capacity - size, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(item)
            room -= size
        bisect.insort(free, (room, row))
    return rows


class Conversations:
    """The conversations of one split: where each lies in the shards (found at its end-of-text token, or at the mark
    on it: see `gpt_moe.data.manifest.CONVERSATION_END`)."""

    def __init__(self, shards: TokenShards, split: str) -> None:
        if shards.content != "chat":
            raise DataError(f"{shards.directory}: not chat data (prepare it with python -m data_prep --format chat)")
        self.shards, self.split = shards, split
        self.tokens, self.masks = shards.tokens(split), shards.masks(split)
        marked = shards.manifest.chat is not None and shards.manifest.chat.ends_marked
        starts, shard_of, lengths = [], [], []
        for s, (tokens, mask) in enumerate(zip(self.tokens, self.masks)):
            # each conversation ends with its end-of-text: found by its mark where the model's template uses the same
            # token inside conversations (a published model's EOS), by the token otherwise
            ends = np.flatnonzero(mask == CONVERSATION_END if marked else tokens == shards.eot_id) + 1
            begins = np.concatenate(([0], ends[:-1]))
            starts.append(begins)
            shard_of.append(np.full(len(ends), s))
            lengths.append(ends - begins)
        self.starts, self.shard = np.concatenate(starts or [[]]).astype(np.int64), np.concatenate(shard_of or [[]])
        self.positions = np.concatenate(lengths or [[]]).astype(np.int64) - 1  # input positions per conversation
        if not len(self.positions):
            raise DataError(f"{shards.directory}: split {split!r} holds no conversations")

    def __len__(self) -> int:
        return len(self.positions)

    def pieces(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n], trained mask [n]) of conversation `index`, its end-of-text included."""
        s, start, n = int(self.shard[index]), int(self.starts[index]), int(self.positions[index]) + 1
        ids = self.tokens[s][start:start + n]
        self.shards.check_ids(ids, self.split, s)
        return ids, self.masks[s][start:start + n]


class PackedRows:
    """The packed rows of a split (see the module docstring); `row(i)` builds row i's tensors. A conversation longer
    than a row is refused, or with `leave_out_longer` left out (`left_out` counts them: an evaluation of a model whose
    context is shorter than the data's longest conversation)."""

    def __init__(self, shards: TokenShards, split: str, seq_len: int, leave_out_longer: bool = False) -> None:
        self.conversations = Conversations(shards, split)
        self.seq_len = seq_len
        positions = self.conversations.positions
        fits = np.flatnonzero(positions <= seq_len)
        self.left_out = len(positions) - len(fits)
        if self.left_out and not leave_out_longer:
            raise DataError(f"{shards.directory}: split {split!r} has a conversation of {int(positions.max()) + 1} "
                            f"tokens, more than --seq-len {seq_len} + 1; raise --seq-len or prepare the data with "
                            f"--max-seq-len {seq_len + 1}")
        self.rows = [[int(fits[i]) for i in row] for row in pack_best_fit(positions[fits], seq_len)]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padding_fraction(self) -> float:
        packed = sum(int(self.conversations.positions[c]) for row in self.rows for c in row)
        return 1 - packed / (len(self.rows) * self.seq_len)

    def row(self, index: int) -> tuple[np.ndarray, ...]:
        """(input ids, labels, positions, segment ids), each int64 [seq_len], of packed row `index`."""
        pieces = []
        for conversation in self.rows[index]:
            tokens, mask = self.conversations.pieces(conversation)
            pieces.append((tokens[:-1], np.where(mask[1:] == 1, tokens[1:].astype(np.int64), IGNORE_INDEX)))
        return fill_row(pieces, self.seq_len)

    def batch(self, rows: np.ndarray) -> PackedBatch:
        return PackedBatch.stack([self.row(int(i)) for i in rows])


class ChatBatches:
    """Shuffled packed training rows for one data-parallel rank; `next_batch()` -> PackedBatch
    [micro_batch, seq_len]. `state_dict()` holds the global row position (any world size resumes it)."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train") -> None:
        self.rows = PackedRows(shards, split, seq_len)
        self.seq_len, self.micro_batch, self.rank, self.world_size = seq_len, micro_batch, rank, world_size
        self.seed, self.split = seed, split
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # keep at most two
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._orders[epoch]

    def row_ids(self, position: int) -> np.ndarray:
        """Row indices this rank reads in the step that starts at global `position`: [micro_batch]."""
        items = position + self.rank * self.micro_batch + np.arange(self.micro_batch, dtype=np.int64)
        epochs, offsets = np.divmod(items, len(self.rows))
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def next_batch(self) -> PackedBatch:
        batch = self.rows.batch(self.row_ids(self.position))
        self.position += self.world_size * self.micro_batch
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "rows_per_epoch": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if "text" in state:
            raise DataError("data loader state: the checkpoint was trained with --mix-pretrain "
                            f"{state.get('text_rows')} text rows per micro-batch; resume it with --mix-pretrain > 0")
        for key in ("seed", "seq_len", "split", "rows_per_epoch"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise DataError(f"data loader state: {key} is {state.get(key)!r} in the checkpoint but {mine!r} now; "
                                "hint: resume with the same data directory, seq_len and seed")
        self.position = int(state["position"])


class ChatValBatches:
    """Validation rows in packing order: batch b on rank r reads rows (b*W + r)*B ..; the first `n_batches`."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, n_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, split: str = "val") -> None:
        self.rows = PackedRows(shards, split, seq_len)
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        available = len(self.rows) // (world_size * micro_batch)
        if available == 0:
            raise DataError(f"{shards.directory}: split {split!r} packs into {len(self.rows)} rows of {seq_len}, "
                            f"fewer than one batch of {world_size} x {micro_batch}; lower --micro-batch")
        self.n_batches = available if n_batches is None else min(n_batches, available)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[PackedBatch]:
        for b in range(self.n_batches):
            first = (b * self.world_size + self.rank) * self.micro_batch
            yield self.rows.batch(np.arange(first, first + self.micro_batch))
