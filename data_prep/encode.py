"""Parallel, order-preserving tokenization of a document stream.

Documents are cut into pieces of at most `max_chars` characters at points where every
tiktoken pattern used here starts a new pre-token, so a cut does not change the tokens
(a newline after a non-space character and before a letter, or a space between two
letters); pieces are grouped into batches of about `batch_chars`; N worker processes
encode the batches. Results come back in submission order and at most 2N + 2 batches
are in flight, so memory stays bounded and the output does not depend on N.

Chat data (`ParallelEncoder(..., chat=True)`) sends conversations instead of text: each is rendered by
`gpt_moe.data.chat_template.render_conversation` into ids and the loss mask, whole (a conversation is never
cut). The tokenizer is ours (tiktoken) or a published model's own (`gpt_moe.data.published_tokenizer`: HF
`tokenizers` or tiktoken; its chat template through Jinja).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from gpt_moe.data.chat_template import render_conversation
from gpt_moe.data.tokenizer import TokenizerInfo, load_saved_tokenizer
from gpt_moe.data.tokenizer_format import Tokenizer

MAX_PIECE_CHARS = 1 << 20
BATCH_CHARS = 1 << 19

# A cut at i is safe when text[i-2:i] is "<non-space>\n" and text[i] a letter, or when
# text[i-1] is a letter and text[i:i+2] is " <letter>". ([^\W\d_] is a letter.)
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=[^\W\d_])|(?<=[^\W\d_])(?= [^\W\d_])")


@dataclass(frozen=True)
class Piece:
    """A run of one document's text; `last`: the document ends here (an end-of-text token follows)."""

    doc: int  # index of the document among the non-empty documents of the stream
    text: str
    last: bool

    @property
    def size(self) -> int:
        """Characters, for batching."""
        return len(self.text)


def split_text(chunks: Iterable[str], max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """Re-cut a document's chunks into non-empty pieces of at most `max_chars` at safe points.

    Looks for the last safe point in the second half of each window; where there is none
    (e.g. a megabyte without a letter) the cut falls at `max_chars`, which may change the
    tokens next to it but never the text.
    """
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > max_chars:
            cut = max_chars
            for match in _SAFE_CUT.finditer(buffer, max_chars // 2, max_chars):
                cut = match.start()
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def pieces(documents: Iterable[Iterable[str]], max_chars: int = MAX_PIECE_CHARS) -> Iterator[Piece]:
    """Number the non-empty documents and cut them into pieces (empty documents are dropped)."""
    doc = 0
    for chunks in documents:
        parts = split_text(chunks, max_chars)
        previous = next(parts, None)
        if previous is None:
            continue
        for text in parts:
            yield Piece(doc, previous, False)
            previous = text
        yield Piece(doc, previous, True)
        doc += 1


def batches(stream: Iterable, batch_chars: int = BATCH_CHARS) -> Iterator[list]:
    """Consecutive pieces (or `ChatPiece`s: anything with a `size` in characters) grouped into lists of about
    `batch_chars` characters."""
    batch: list = []
    size = 0
    for piece in stream:
        batch.append(piece)
        size += piece.size
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_texts(enc: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all texts concatenated ([total] of `dtype`) and per-text counts ([len(texts)] int64)."""
    encoded = [enc.encode_ordinary(text) for text in texts]
    lengths = np.array([len(tokens) for tokens in encoded], dtype=np.int64)
    return np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum())), lengths


def render_conversations(enc: Tokenizer, conversations: list, dtype: np.dtype
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids of the conversations concatenated ([total] of `dtype`), per-conversation counts ([n] int64) and the
    loss masks concatenated ([total] uint8), by `gpt_moe.data.chat_template.render_conversation`; a None (a bad row)
    gives
    nothing."""

    rendered = [render_conversation(enc, messages) if messages is not None else ([], []) for messages in conversations]
    lengths = np.array([len(ids) for ids, _ in rendered], dtype=np.int64)
    total = int(lengths.sum())
    return (np.fromiter(chain.from_iterable(ids for ids, _ in rendered), dtype=dtype, count=total), lengths,
            np.fromiter(chain.from_iterable(mask for _, mask in rendered), dtype=np.uint8, count=total))


@lru_cache(maxsize=2)
def _cached_encoding(directory: str, info_json: str) -> Tokenizer:
    """One tokenizer per worker process, rebuilt from the saved tokenizer files (hashes checked)."""
    return load_saved_tokenizer(TokenizerInfo.from_dict(json.loads(info_json)), Path(directory))


def _encode_task(directory: str, info_json: str, dtype: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray, None]:
    return (*encode_texts(_cached_encoding(directory, info_json), texts, np.dtype(dtype)), None)


def _render_task(directory: str, info_json: str, dtype: str, conversations: list) -> tuple[np.ndarray, ...]:
    return render_conversations(_cached_encoding(directory, info_json), conversations, np.dtype(dtype))


class ParallelEncoder:
    """Encodes batches of pieces with `workers` processes (inline when workers == 1), in order.

    The tokenizer must already be saved in `directory` (workers load it from there).
    Use as a context manager; `map()` yields (batch, tokens, lengths, masks) per input batch: masks is
    None for text, the concatenated loss masks (uint8, aligned with tokens) for chat data (`chat=True`).
    """

    def __init__(self, workers: int, directory: Path, info: TokenizerInfo, dtype: np.dtype, chat: bool = False):
        self.workers = workers
        self.args = (str(directory), json.dumps(info.to_dict(), sort_keys=True), np.dtype(dtype).str)
        self.task = _render_task if chat else _encode_task
        self.payload = (lambda p: p.messages) if chat else (lambda p: p.text)
        self.pool = None

    def __enter__(self) -> ParallelEncoder:
        if self.workers > 1:
            # On Linux, fork: workers start in milliseconds and inherit the tokenizer built here
            # (spawn costs ~0.3 s of imports per worker). They encode one text at a time (tiktoken, or
            # HF tokenizers' single-text encode, which never starts its thread pool), so a thread pool
            # left in the parent by BPE training (HF tokenizers) does not concern them.
            _cached_encoding(*self.args[:2])
            method = "fork" if sys.platform == "linux" else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.workers)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, stream: Iterable[list]) -> Iterator[tuple[list, np.ndarray, np.ndarray, np.ndarray | None]]:
        if self.pool is None:
            for batch in stream:
                yield (batch, *self.task(*self.args, [self.payload(p) for p in batch]))
            return
        pending: deque = deque()
        window = 2 * self.workers + 2
        for batch in stream:
            payload = [self.payload(p) for p in batch]
            pending.append((batch, self.pool.apply_async(self.task, (*self.args, payload))))
            if len(pending) >= window:
                batch, result = pending.popleft()
                yield (batch, *result.get())
        while pending:
            batch, result = pending.popleft()
            yield (batch, *result.get())
