"""One preparation run: corpus -> tokenizer -> parallel encoding -> shards -> manifest.

    prepare(PrepareConfig(sources=("builtin",), tokenizer="bpe:4096", out=Path("data/builtin")))

Order of work: check the arguments, the corpus and the output directory (only a new or
empty directory or one data_prep made is used); take the directory's lock (one run at a
time); report an identical finished dataset, refuse a different one, resume an unfinished
one; build the tokenizer (train `bpe:N` on the first `bpe_sample_chars` characters) and save
it with a progress record; stream the documents through the workers, writing parts;
write the manifest. Each document is followed by the end-of-text token; `max_tokens`
stops the stream after exactly that many tokens (cutting the last document).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.build_tokenizer import BaseTokenizer, build_tokenizer, require_chat_format, tokenizer_from
from data_prep.chat_rows import ChatCorpus, ChatPiece, bad_row_error, chat_pieces, open_chat_corpus, skipped_report
from data_prep.encode import ParallelEncoder, Piece, batches, pieces
from data_prep.lock import output_lock
from data_prep.manifest import (OutputState, PartRecord, Progress, SkippedRows, SplitCount, check_ownership,
                                check_template, check_tokenizer, inspect_output, remove_stale_files)
from data_prep.shards import SHARD_NAME, ShardWriter, is_val, mask_name, part_number
from data_prep.sources import Corpus, open_corpus
from gpt_moe.atomic import fsync_dir, write_atomic
from gpt_moe.data.chat_template import template_sha256
from gpt_moe.data.manifest import (CONVERSATION_END, DEFAULT_CHAT_DATA_DIR, DEFAULT_DATA_DIR, MANIFEST_FILE,
                                   PROGRESS_FILE, SPLITS, Manifest, ShardInfo, dtype_for_vocab, sha256_file)
from gpt_moe.data.tokenizer import load_saved_tokenizer, parse_tokenizer_spec, save_tokenizer, tokenizer_info
from gpt_moe.data.verify import check_data
from gpt_moe.dir_lock import DirectoryLock
from gpt_moe.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(DEFAULT_DATA_DIR)
DEFAULT_CHAT_OUT = Path(DEFAULT_CHAT_DATA_DIR)


FORMATS = ("text", "chat")
DEFAULT_TOKENIZER = "bpe:4096"


@dataclass(frozen=True)
class PrepareConfig:
    """The options of `python -m data_prep` (see its --help). `tokenizer` None: `DEFAULT_TOKENIZER` for text;
    chat data needs `tokenizer_from` (or a standard encoding or `.tiktoken` file as `tokenizer`)."""

    sources: tuple[str, ...] = ("builtin",)
    tokenizer: str | None = None
    out: Path = DEFAULT_OUT
    workers: int = 1
    val_fraction: float = 0.01
    max_tokens: int | None = None
    text_field: str = "text"
    shard_tokens: int = 1 << 24
    bpe_sample_chars: int = 1 << 25
    progress_bar: bool = True
    format: str = "text"  # "text" | "chat"
    tokenizer_from: str | None = None  # a data directory, training run, checkpoint or export
    messages_field: str = "messages"
    max_seq_len: int = 2048  # chat: the longest conversation kept, in tokens with its end-of-text
    strict: bool = False  # chat: the first bad row is an error instead of skipped

    @property
    def chat(self) -> bool:
        return self.format == "chat"

    @property
    def tokenizer_spec(self) -> str | None:
        """The --tokenizer value in effect (None when the tokenizer comes from --tokenizer-from)."""
        if self.tokenizer is None and self.tokenizer_from is None and not self.chat:
            return DEFAULT_TOKENIZER
        return self.tokenizer

    def validate(self) -> None:
        checks = [("--format", self.format, self.format in FORMATS, f"one of {', '.join(FORMATS)}"),
                  ("--workers", self.workers, self.workers >= 1, "an integer >= 1"),
                  ("--val-fraction", self.val_fraction, 0.0 <= self.val_fraction < 1.0, "a number in [0, 1)"),
                  ("--max-tokens", self.max_tokens, self.max_tokens is None or self.max_tokens > 0, "a positive count"),
                  ("--shard-tokens", self.shard_tokens, self.shard_tokens > 0, "a positive count"),
                  ("--bpe-sample-chars", self.bpe_sample_chars, self.bpe_sample_chars > 0, "a positive count"),
                  ("--max-seq-len", self.max_seq_len, self.max_seq_len >= 2, "an integer >= 2")]
        for flag, value, ok, expected in checks:
            if not ok:
                raise DataError(f"{flag} {value}: expected {expected}")
        if self.tokenizer is not None and self.tokenizer_from is not None:
            raise DataError(f"--tokenizer {self.tokenizer} and --tokenizer-from {self.tokenizer_from}: expected one "
                            "of them; hint: --tokenizer-from copies the tokenizer of a model or dataset")
        if self.chat and self.tokenizer_spec is None and self.tokenizer_from is None:
            raise DataError("--format chat: chat data must use the tokenizer of the model it fine-tunes; hint: pass "
                            "--tokenizer-from DIR (its data directory, training run or export), or --tokenizer NAME")
        if self.chat and self.tokenizer_spec is not None and parse_tokenizer_spec(self.tokenizer_spec).kind == "bpe":
            raise DataError(f"--format chat --tokenizer {self.tokenizer_spec}: a new BPE cannot be what a base model "
                            "was trained with; hint: pass --tokenizer-from DIR (its data directory, run or export)")

    def output_args(self) -> dict:
        """The options that determine the output bytes (recorded in the manifest; as before for text data)."""
        args = {"sources": list(self.sources), "tokenizer": self.tokenizer_spec, "text_field": self.text_field,
                "val_fraction": self.val_fraction, "max_tokens": self.max_tokens, "shard_tokens": self.shard_tokens,
                "bpe_sample_chars": self.bpe_sample_chars}
        if self.tokenizer_from is not None:
            args["tokenizer_from"] = str(self.tokenizer_from)
        if self.chat:
            args = {"format": self.format, "sources": args["sources"], "tokenizer": args["tokenizer"],
                    "tokenizer_from": args.get("tokenizer_from"), "messages_field": self.messages_field,
                    "val_fraction": self.val_fraction, "max_tokens": self.max_tokens, "shard_tokens": self.shard_tokens,
                    "max_seq_len": self.max_seq_len}
        return args


@dataclass(frozen=True)
class PrepareResult:
    """What a run did: `tokens` and `seconds` cover this run's encoding phase only."""

    out: Path
    manifest: Manifest
    already_prepared: bool = False
    resumed_parts: int = 0
    tokens: int = 0
    documents: int = 0
    seconds: float = 0.0
    rebuilt: tuple[tuple[str, str], ...] = ()  # (file, what was wrong with it) of a finished directory


def created_at() -> str:
    """UTC creation time; `SOURCE_DATE_EPOCH` (reproducible builds convention) fixes it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Rebuild:
    """Re-encoding part of a finished dataset to rebuild its `damaged` shard files: every shard made is
    checked against the manifest's record (`expected`), only damaged ones are written, and the stream
    stops after part `last_part`."""

    out: Path
    expected: dict[str, ShardInfo]
    damaged: frozenset[str]
    last_part: int

    def check(self, writer: ShardWriter) -> None:
        """Refuse (without writing) a re-encoded shard that is not the one the manifest records."""
        made, expected = writer.info(), self.expected.get(writer.path.name)
        if expected is None or (made.tokens, made.sha256, made.mask_sha256) != (expected.tokens, expected.sha256,
                                                                                 expected.mask_sha256):
            writer.abort()
            recorded = (f"{expected.tokens} tokens, sha256 {expected.sha256[:12]}..." if expected
                        else "no such shard")
            raise DataError(f"{writer.path}: re-encoding the corpus gives {made.tokens} tokens, sha256 "
                            f"{made.sha256[:12]}..., the manifest records {recorded}: the corpus, the tokenizer or "
                            f"data_prep changed since the data was prepared, so it cannot be rebuilt; "
                            f"hint: delete {self.out} and prepare it again")


class _PartWriter:
    """Appends encoded pieces to the current part's shards and closes parts as they fill (or, with a
    `Rebuild`, re-makes parts of a finished dataset to rebuild its damaged shards).

    Chat data: every piece is a row; a good conversation is written whole with its loss mask, a bad row
    (or a conversation longer than --max-seq-len) is counted in `skipped` (or, with --strict, an error)."""

    def __init__(self, out: Path, progress: Progress, config: PrepareConfig, rebuild: Rebuild | None = None):
        self.out, self.progress, self.config, self.rebuild = out, progress, config, rebuild
        self.done = False  # a rebuild has made its last part
        last = progress.parts[-1] if progress.parts else None
        self.counts = copy.deepcopy(last.splits) if last else {"train": SplitCount(), "val": SplitCount()}
        self.chat = progress.content == "chat"
        self.skipped = copy.deepcopy(last.skipped) if last and last.skipped else SkippedRows()
        self.pieces = last.pieces if last else 0
        self.total = last.tokens if last else 0
        self.dtype = np.dtype(progress.dtype).newbyteorder("<")
        self.eot = np.array([progress.tokenizer.eot_id], dtype=self.dtype)
        self.prefix = np.array(progress.tokenizer.document_prefix, dtype=self.dtype)  # a published model's BOS
        # a published model's template may close turns with its EOS: the end-of-text closing a conversation is marked
        self.conversation_end = CONVERSATION_END if progress.tokenizer.published else 0
        self.limit = config.max_tokens if config.max_tokens is not None else float("inf")
        self.writers: dict[str, ShardWriter] = {}
        self.part_tokens = 0

    def add(self, piece: Piece | ChatPiece, tokens: np.ndarray, mask: np.ndarray | None = None) -> bool:
        """Write one piece (plus end-of-text if its document ends; chat data: a whole conversation and its mask);
        False once max_tokens is reached (or a rebuild is done)."""
        if self.chat:
            if not self._add_conversation(piece, tokens, mask):
                return False
        else:
            split = "val" if is_val(piece.doc, self.config.val_fraction) else "train"
            if len(self.prefix) and self.counts[split].last_doc != piece.doc:  # the document's first piece
                tokens = np.concatenate([self.prefix, tokens])
            if piece.last:
                tokens = np.concatenate([tokens, self.eot])
            room = self.limit - self.total
            if len(tokens) > room:
                tokens = tokens[:int(room)]
            self._write(split, piece.doc, tokens)
        self.pieces += 1
        if self.total >= self.limit:
            return False
        if self.part_tokens >= self.config.shard_tokens:
            self.close_part()
        return not self.done

    def _add_conversation(self, piece: ChatPiece, tokens: np.ndarray, mask: np.ndarray) -> bool:
        """Write a conversation, or count its row as skipped; False when it does not fit under max_tokens."""
        problem, detail = piece.problem, piece.detail
        if problem is None and len(tokens) + 1 > self.config.max_seq_len:
            problem, detail = "too_long", (f"{len(tokens) + 1} tokens with the end-of-text token, more than "
                                           f"--max-seq-len {self.config.max_seq_len}")
        if problem is not None:
            if self.config.strict:
                raise bad_row_error(piece.where, problem, detail)
            self.skipped.add(problem, piece.where, detail)
            return True
        conversations = self.counts["train"].documents + self.counts["val"].documents
        split = piece.split or ("val" if is_val(conversations, self.config.val_fraction) else "train")
        tokens = np.concatenate([tokens, self.eot])
        mask = np.concatenate([mask, np.full(1, self.conversation_end, mask.dtype)])
        if len(tokens) > self.limit - self.total:
            return False  # a conversation is never cut
        self._write(split, piece.doc, tokens, mask)
        return True

    def _write(self, split: str, doc: int, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        if not len(tokens):
            return
        if split not in self.writers:
            name = SHARD_NAME.format(split=split, part=len(self.progress.parts))
            keep = self.rebuild is None or name in self.rebuild.damaged
            keep_mask = self.rebuild is None or mask_name(name) in self.rebuild.damaged
            self.writers[split] = ShardWriter(self.out / name, self.dtype, keep=keep, mask=self.chat,
                                              keep_mask=keep_mask)
        self.writers[split].write(tokens, mask)
        count = self.counts[split]
        if count.last_doc != doc:
            count.documents += 1
            count.last_doc = doc
        count.tokens += len(tokens)
        count.trained_tokens += 0 if mask is None else int((mask == 1).sum())
        self.total += len(tokens)
        self.part_tokens += len(tokens)

    def close_part(self) -> None:
        """Rename the part's shards complete and record the part (no-op when it is empty; chat data records a part
        without shards when only skipped rows followed the last one, so that they are counted)."""
        recorded = self.progress.parts[-1].pieces if self.progress.parts else 0
        if not self.writers and not (self.chat and self.pieces > recorded):
            return
        if self.rebuild is not None:
            for writer in self.writers.values():
                self.rebuild.check(writer)
        shards = tuple((split, self.writers[split].close()) for split in SPLITS if split in self.writers)
        self.writers = {}
        fsync_dir(self.out)
        record = PartRecord(pieces=self.pieces, tokens=self.total, splits=copy.deepcopy(self.counts), shards=shards,
                            skipped=copy.deepcopy(self.skipped) if self.chat else None)
        self.progress = dataclasses.replace(self.progress, parts=self.progress.parts + (record,))
        if self.rebuild is None:
            self.progress.save(self.out)
        else:
            self.done = len(self.progress.parts) > self.rebuild.last_part
        self.part_tokens = 0

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers = {}


def prepare(config: PrepareConfig) -> PrepareResult:
    """Prepare (or resume, or report) the dataset described by `config`; DataError on bad input.

    Holds the output directory's lock (`.data_prep.lock`) while it works: a second run on the same
    directory is refused at once.
    """
    config.validate()
    if config.tokenizer_spec is not None:
        parse_tokenizer_spec(config.tokenizer_spec)
    base = _base_tokenizer(config)
    corpus = open_chat_corpus(config.sources) if config.chat else open_corpus(config.sources, config.text_field)
    out = Path(config.out)
    check_ownership(out)  # before anything reads the corpus or writes
    finished = (out / MANIFEST_FILE).is_file()
    head = None if finished else _read_head(corpus, config)
    with output_lock(out, read_only_ok=finished) as lock:
        state = inspect_output(out, config.output_args())
        _check_identity(out, state, config, base)
        if state.manifest is not None:
            return _check_finished(out, config, corpus, state.manifest, lock, base)
        lock.require_writable()
        return _prepare_into(out, config, corpus, state.progress, head or _read_head(corpus, config), base)


def _base_tokenizer(config: PrepareConfig) -> BaseTokenizer | None:
    """--tokenizer-from's tokenizer (hash checked; for chat data, its chat markers too), read before any work."""
    if config.tokenizer_from is None:
        return None
    base = tokenizer_from(config.tokenizer_from)
    if config.chat:
        require_chat_format(base.encoding, base.where)
    return base


def _template_sha256(config: PrepareConfig, base: BaseTokenizer | None) -> str | None:
    """Chat data: the identity of the template its conversations are rendered with (ours, or the base model's own)."""
    if not config.chat:
        return None
    return template_sha256(base.encoding if base is not None else None)


def _check_identity(out: Path, state: OutputState, config: PrepareConfig, base: BaseTokenizer | None) -> None:
    """Refuse to mix another --tokenizer-from tokenizer, or another chat template, into an existing directory."""
    recorded = state.manifest or state.progress
    if recorded is None:
        return
    if base is not None:
        check_tokenizer(out, recorded.tokenizer, base.info, base.where)
    if config.chat:
        template = (state.manifest.chat.template_sha256 if state.manifest is not None and state.manifest.chat
                    else state.progress.chat_template if state.progress is not None else None)
        check_template(out, template, _template_sha256(config, base))


def _stream(config: PrepareConfig, corpus: Corpus | ChatCorpus) -> Iterator[Piece | ChatPiece]:
    """The corpus as the stream of pieces the encoder consumes: text pieces, or one `ChatPiece` per row."""
    return chat_pieces(corpus.rows(), config.messages_field) if config.chat else pieces(corpus.documents())


def _check_finished(out: Path, config: PrepareConfig, corpus: Corpus | ChatCorpus, manifest: Manifest,
                    lock: DirectoryLock, base: BaseTokenizer | None) -> PrepareResult:
    """Verify a finished directory (hashing only what its verification record does not vouch for) and
    rebuild its damaged or missing files: output is deterministic, so re-encoding from the part of the
    first damaged shard reproduces it and every later one."""
    damaged = _damaged_files(out, manifest)
    if not damaged:
        if lock.writable:
            (out / PROGRESS_FILE).unlink(missing_ok=True)
        log.info("%s is already prepared (%s); nothing to do", out, _summary(manifest))
        return PrepareResult(out, manifest, already_prepared=True)
    for name, problem in damaged.items():
        log.warning("%s: %s", out / name, problem)
    lock.require_writable()
    remove_stale_files(out, _shard_files(manifest))
    if set(manifest.tokenizer.file_hashes()) & set(damaged):
        _rebuild_tokenizer(out, config, corpus, manifest, base)
    shards = frozenset(damaged) - set(manifest.tokenizer.file_hashes())
    if shards:
        _rebuild_shards(out, config, corpus, manifest, shards)
    still = _damaged_files(out, manifest)
    if still:
        name, problem = next(iter(still.items()))
        raise DataError(f"{out / name}: {problem} after rebuilding (the corpus changed, or something else writes "
                        f"there); hint: delete {out} and prepare it again")
    log.info("%s: rebuilt %s", out, ", ".join(damaged))
    return PrepareResult(out, manifest, rebuilt=tuple(damaged.items()))


def _damaged_files(out: Path, manifest: Manifest) -> dict[str, str]:
    """File name -> what is wrong with it, for every shard and the tokenizer files of a finished directory."""
    damaged = {problem.file: problem.problem for problem in check_data(out, manifest, "first").problems}
    for name, recorded in manifest.tokenizer.file_hashes().items():
        if not (out / name).is_file():
            damaged[name] = "missing"
        elif (digest := sha256_file(out / name)) != recorded:
            damaged[name] = f"sha256 {digest[:12]}... differs from the manifest's {recorded[:12]}..."
    return damaged


def _files_of(shards: Iterable[ShardInfo], dtype: str) -> set[str]:
    """The names of these token shards and their mask shards (chat data)."""
    return {name for shard in shards for name, _, _ in shard.files(np.dtype(dtype).itemsize)}


def _shard_files(manifest: Manifest) -> set[str]:
    """The names of the token shards and mask shards a manifest lists."""
    return _files_of([shard for split in manifest.splits.values() for shard in split.shards], manifest.dtype)


def _rebuild_tokenizer(out: Path, config: PrepareConfig, corpus: Corpus | ChatCorpus, manifest: Manifest,
                       base: BaseTokenizer | None) -> None:
    if base is not None:  # copied: the source must still hold the same tokenizer
        sha256, what = base.info.sha256, f"the tokenizer of {base.where}"
    else:
        enc = build_tokenizer(str(config.tokenizer_spec), corpus, config.bpe_sample_chars)
        sha256, what = tokenizer_info(enc).sha256, f"building {config.tokenizer_spec} again"
    if sha256 != manifest.tokenizer.sha256:
        raise DataError(f"{out / manifest.tokenizer.file}: {what} gives another tokenizer than the manifest records "
                        "(the corpus, the source or the library changed), so it cannot be rebuilt; "
                        f"hint: delete {out} and prepare it again")
    if base is not None:
        base.copy_to(out)
    else:
        save_tokenizer(enc, out)


def _rebuild_shards(out: Path, config: PrepareConfig, corpus: Corpus | ChatCorpus, manifest: Manifest,
                    damaged: frozenset[str]) -> None:
    """Re-encode from the part of the first damaged shard (from the start with a manifest that does not
    record its parts) through the part of the last one, writing the damaged shards only."""
    parts = sorted(part_number(name) for name in damaged)
    finished = Progress.from_manifest(manifest)
    start = parts[0] if finished is not None else 0
    progress = Progress(created_at=manifest.created_at, source=manifest.source, args=manifest.args,
                        tokenizer=manifest.tokenizer, dtype=manifest.dtype,
                        parts=finished.parts[:start] if finished is not None else (),
                        chat_template=manifest.chat.template_sha256 if manifest.chat else None)
    log.info("%s: re-encoding parts %d to %d", out, start, parts[-1])
    expected = {shard.file: shard for split in manifest.splits.values() for shard in split.shards}
    writer = _PartWriter(out, progress, config, Rebuild(out, expected, damaged, parts[-1]))
    _encode(_stream(config, corpus), writer, config, corpus.n_documents)


def _prepare_into(out: Path, config: PrepareConfig, corpus: Corpus | ChatCorpus, progress: Progress | None,
                  head: tuple[list, Iterator], base: BaseTokenizer | None) -> PrepareResult:
    """Build the tokenizer (or check the saved one), encode the pieces after the kept parts, write the manifest."""
    if progress is None:
        info = base.copy_to(out) if base is not None else save_tokenizer(
            build_tokenizer(str(config.tokenizer_spec), corpus, config.bpe_sample_chars), out)
        progress = Progress(created_at=created_at(), source=corpus.description, args=config.output_args(),
                            tokenizer=info, dtype=dtype_for_vocab(info.n_vocab).name,
                            chat_template=_template_sha256(config, base))
        progress.save(out)
    else:
        load_saved_tokenizer(progress.tokenizer, out)  # refuses a tokenizer file that changed
        log.info("resuming %s: keeping %d completed part(s) (%d tokens)", out, len(progress.parts),
                 progress.parts[-1].tokens if progress.parts else 0)
    remove_stale_files(out, _files_of([shard for part in progress.parts for _, shard in part.shards], progress.dtype))

    writer = _PartWriter(out, progress, config)
    start_tokens, resumed_parts = writer.total, len(progress.parts)
    start = time.perf_counter()
    documents = _encode(chain(*head), writer, config, corpus.n_documents)
    seconds = time.perf_counter() - start

    manifest = writer.progress.manifest()
    _check_complete(out, config, corpus, manifest)
    write_atomic(out / MANIFEST_FILE, manifest.to_json().encode())
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    result = PrepareResult(out, manifest, resumed_parts=resumed_parts, tokens=writer.total - start_tokens,
                           documents=documents, seconds=seconds)
    log.info("prepared %s in %.1fs (%s tokens/s): %s", out, seconds, f"{result.tokens / max(seconds, 1e-9):,.0f}",
             _summary(manifest))
    if manifest.chat is not None and any(manifest.chat.skipped.values()):
        log.warning("%s: skipped %d bad row(s): %s", out, sum(manifest.chat.skipped.values()),
                    skipped_report(manifest.chat.skipped, manifest.chat.skipped_first))
    return result


def _check_complete(out: Path, config: PrepareConfig, corpus: Corpus | ChatCorpus, manifest: Manifest) -> None:
    """Refuse a finished stream without a conversation, or without the validation split asked for (its parts
    stay, unfinished)."""
    if manifest.chat is not None and not sum(split.documents for split in manifest.splits.values()):
        report = skipped_report(manifest.chat.skipped, manifest.chat.skipped_first)
        raise DataError(f"{out}: no conversation kept, every row was skipped: {report}; hint: fix the rows, "
                        "or raise --max-seq-len if they are too long")
    if config.val_fraction > 0 and not getattr(corpus, "decides_split", False) \
            and not manifest.splits["val"].documents:
        raise _no_validation_document(config, out, manifest)


HEAD_PIECES = 16
"""Pieces (of at most 1M characters each) read before anything is written, to see a second document."""
HEAD_ROWS = 1000
"""Chat rows read before anything is written, to see the conversations a validation split needs."""


def _read_head(corpus: Corpus | ChatCorpus, config: PrepareConfig) -> tuple[list, Iterator]:
    """The corpus' first pieces (through the first piece of document 1, at most HEAD_PIECES) and the rest.

    Refused here, before anything is written: an empty corpus, and a single document when a
    validation split is asked for (it needs a second document, see `shards.is_val`).
    """
    if config.chat:
        return _read_chat_head(corpus, config)
    stream = _stream(config, corpus)
    head: list[Piece] = []
    for piece in stream:
        head.append(piece)
        if piece.doc >= 1 or len(head) >= HEAD_PIECES:
            break
    if not head:
        raise DataError(f"empty corpus: {corpus.description} yielded no text; hint: check the --source paths "
                        "and --text-field")
    if config.val_fraction > 0 and head[-1].doc == 0 and len(head) < HEAD_PIECES:
        raise DataError(f"{corpus.description}: 1 document, too few for a validation split (--val-fraction "
                        f"{config.val_fraction:g}); hint: add documents, or pass --val-fraction 0 for no validation "
                        "split")
    return head, stream


def _read_chat_head(corpus: ChatCorpus, config: PrepareConfig) -> tuple[list[ChatPiece], Iterator[ChatPiece]]:
    """The first rows, through the conversations a validation split needs (at most HEAD_ROWS) and the rest.

    Refused here, before anything is written: a corpus without a conversation in its first rows (with what
    was wrong with them), a single conversation when a validation split is asked for, and with --strict a
    bad row among them."""
    stream = _stream(config, corpus)
    need = 1 if corpus.decides_split or config.val_fraction == 0 else 2
    head: list[ChatPiece] = []
    skipped = SkippedRows()
    for piece in stream:
        head.append(piece)
        if piece.problem is not None:
            if config.strict:
                raise bad_row_error(piece.where, piece.problem, piece.detail)
            skipped.add(piece.problem, piece.where, piece.detail)
        if len(head) - sum(skipped.counts.values()) >= need or len(head) >= HEAD_ROWS:
            break
    good = len(head) - sum(skipped.counts.values())
    if not head:
        raise DataError(f"empty corpus: {corpus.description} yielded no rows; hint: check the --source paths")
    if not good:
        raise DataError(f"{corpus.description}: no conversation in the first {len(head)} row(s): "
                        f"{skipped_report(skipped.counts, skipped.first)}; hint: rows need {config.messages_field!r} "
                        "(a list of {role, content}; --messages-field NAME) or prompt and completion")
    if good < need and len(head) < HEAD_ROWS:
        raise DataError(f"{corpus.description}: 1 conversation, too few for a validation split (--val-fraction "
                        f"{config.val_fraction:g}); hint: add conversations, or pass --val-fraction 0 for no "
                        "validation split")
    return head, stream


def _no_validation_document(config: PrepareConfig, out: Path, manifest: Manifest) -> DataError:
    """The error for a finished stream without a validation document (its parts stay, unfinished)."""
    noun = "conversation" if config.chat else "document"
    slack = config.max_seq_len if config.chat else 0  # a conversation that does not fit is not cut: it stops early
    if config.max_tokens is not None and manifest.splits["train"].tokens >= config.max_tokens - slack:
        cause = (f"--max-tokens {config.max_tokens} stops before a validation conversation" if config.chat else
                 f"--max-tokens {config.max_tokens} ends inside the first document")
        fix = "raise --max-tokens"
    else:
        cause = f"the corpus has {manifest.splits['train'].documents} {noun}(s)"
        fix = f"add {noun}s"
    return DataError(f"{out}: {cause}: no validation {noun} for --val-fraction {config.val_fraction:g}; "
                     f"hint: {fix}, or delete {out} and pass --val-fraction 0 for no validation split")


def prepare_default(out: Path = DEFAULT_OUT) -> PrepareResult:
    """The built-in offline corpus with the default tokenizer (what `python -m data_prep` does), all CPUs."""
    return prepare(PrepareConfig(out=Path(out), workers=os.cpu_count() or 1))


def prepare_default_chat(out: Path = DEFAULT_CHAT_OUT, tokenizer_from: Path = DEFAULT_OUT) -> PrepareResult:
    """The built-in conversations (`--source builtin-chat`) in the tokenizer of `tokenizer_from` (the base model's
    data directory, training run or checkpoint, or export), all CPUs: what `python -m data_prep --format chat
    --source builtin-chat --tokenizer-from DIR --out OUT` does. Rerunning it on a prepared `out` verifies it."""
    return prepare(PrepareConfig(sources=("builtin-chat",), format="chat", tokenizer_from=str(tokenizer_from),
                                 out=Path(out), workers=os.cpu_count() or 1))


def _encode(stream: Iterator[Piece | ChatPiece], writer: _PartWriter, config: PrepareConfig,
            n_documents: int | None) -> int:
    """Tokenize the pieces (chat data: render the conversations) after those already written, in parallel, into
    `writer`; documents (chat data: rows) finished."""
    in_tokens = config.max_tokens is not None  # the bar counts tokens towards the cap, else documents
    start, start_tokens, documents = time.perf_counter(), writer.total, 0
    try:
        # the workers start (fork) before the bar, whose monitor thread they need not inherit
        with ParallelEncoder(config.workers, writer.out, writer.progress.tokenizer, writer.dtype,
                             chat=writer.chat) as encoder, \
                tqdm(total=config.max_tokens if in_tokens else n_documents, initial=writer.total if in_tokens else 0,
                     unit="tok" if in_tokens else "doc", unit_scale=True, dynamic_ncols=True, desc="tokenizing",
                     disable=None if config.progress_bar else True) as bar:  # None: off when not a terminal
            for batch, tokens, lengths, masks in encoder.map(batches(islice(stream, writer.pieces, None))):
                before, going = writer.total, True
                for piece, end, length in zip(batch, np.cumsum(lengths).tolist(), lengths.tolist()):
                    mask = None if masks is None else masks[end - length:end]
                    going = writer.add(piece, tokens[end - length:end], mask)
                    documents += piece.last
                    if not going:
                        break
                rate = (writer.total - start_tokens) / max(time.perf_counter() - start, 1e-9)
                bar.update(writer.total - before if in_tokens else sum(p.last for p in batch))
                bar.set_postfix_str(f"docs={documents:,}" if in_tokens else  # the bar itself shows tokens/s
                                    f"tokens={writer.total / 1e6:,.2f}M tok/s={rate / 1e6:,.2f}M", refresh=False)
                if not going:
                    break
            writer.close_part()
            bar.total = bar.n  # done: the document count was an estimate, the cap may exceed the corpus
    except BaseException:
        writer.abort()
        raise
    return documents


def _summary(manifest: Manifest) -> str:
    parts = [f"{name} {split.tokens:,} tokens / {split.documents:,} docs / {len(split.shards)} shards"
             for name, split in manifest.splits.items()]
    return f"{'; '.join(parts)}; tokenizer {manifest.tokenizer.name} (n_vocab {manifest.tokenizer.n_vocab})"
