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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.build_tokenizer import build_tokenizer
from data_prep.encode import ParallelEncoder, Piece, batches, pieces
from data_prep.manifest import (PartRecord, Progress, SplitCount, check_ownership, inspect_output,
                               remove_stale_files)
from data_prep.lock import OutputLock
from data_prep.shards import SHARD_NAME, ShardWriter, is_val, part_number
from data_prep.sources import Corpus, open_corpus
from gpt_moe.atomic import fsync_dir, write_atomic
from gpt_moe.data import (DEFAULT_DATA_DIR, MANIFEST_FILE, PROGRESS_FILE, Manifest, ShardInfo, dtype_for_vocab,
                          sha256_file)
from gpt_moe.data_verify import check_data
from gpt_moe.errors import DataError
from gpt_moe.tokenizer import load_saved_tokenizer, parse_tokenizer_spec, save_tokenizer, tokenizer_info

log = logging.getLogger(__name__)

DEFAULT_OUT = Path(DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class PrepareConfig:
    """The options of `python -m data_prep` (see its --help)."""

    sources: tuple[str, ...] = ("builtin",)
    tokenizer: str = "bpe:4096"
    out: Path = DEFAULT_OUT
    workers: int = 1
    val_fraction: float = 0.01
    max_tokens: int | None = None
    text_field: str = "text"
    shard_tokens: int = 1 << 24
    bpe_sample_chars: int = 1 << 25
    progress_bar: bool = True

    def validate(self) -> None:
        checks = [("--workers", self.workers, self.workers >= 1, "an integer >= 1"),
                  ("--val-fraction", self.val_fraction, 0.0 <= self.val_fraction < 1.0, "a number in [0, 1)"),
                  ("--max-tokens", self.max_tokens, self.max_tokens is None or self.max_tokens > 0, "a positive count"),
                  ("--shard-tokens", self.shard_tokens, self.shard_tokens > 0, "a positive count"),
                  ("--bpe-sample-chars", self.bpe_sample_chars, self.bpe_sample_chars > 0, "a positive count")]
        for flag, value, ok, expected in checks:
            if not ok:
                raise DataError(f"{flag} {value}: expected {expected}")

    def output_args(self) -> dict:
        """The options that determine the output bytes (recorded in the manifest)."""
        return {"sources": list(self.sources), "tokenizer": self.tokenizer, "text_field": self.text_field,
                "val_fraction": self.val_fraction, "max_tokens": self.max_tokens, "shard_tokens": self.shard_tokens,
                "bpe_sample_chars": self.bpe_sample_chars}


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
        if expected is None or (made.tokens, made.sha256) != (expected.tokens, expected.sha256):
            writer.abort()
            recorded = (f"{expected.tokens} tokens, sha256 {expected.sha256[:12]}..." if expected
                        else "no such shard")
            raise DataError(f"{writer.path}: re-encoding the corpus gives {made.tokens} tokens, sha256 "
                            f"{made.sha256[:12]}..., the manifest records {recorded}: the corpus, the tokenizer or "
                            f"data_prep changed since the data was prepared, so it cannot be rebuilt; "
                            f"hint: delete {self.out} and prepare it again")


class _PartWriter:
    """Appends encoded pieces to the current part's shards and closes parts as they fill (or, with a
    `Rebuild`, re-makes parts of a finished dataset to rebuild its damaged shards)."""

    def __init__(self, out: Path, progress: Progress, config: PrepareConfig, rebuild: Rebuild | None = None):
        self.out, self.progress, self.config, self.rebuild = out, progress, config, rebuild
        self.done = False  # a rebuild has made its last part
        last = progress.parts[-1] if progress.parts else None
        self.counts = copy.deepcopy(last.splits) if last else {"train": SplitCount(), "val": SplitCount()}
        self.pieces = last.pieces if last else 0
        self.total = last.tokens if last else 0
        self.dtype = np.dtype(progress.dtype).newbyteorder("<")
        self.eot = np.array([progress.tokenizer.eot_id], dtype=self.dtype)
        self.limit = config.max_tokens if config.max_tokens is not None else float("inf")
        self.writers: dict[str, ShardWriter] = {}
        self.part_tokens = 0

    def add(self, piece: Piece, tokens: np.ndarray) -> bool:
        """Write one piece (plus end-of-text if its document ends); False once max_tokens is reached (or a
        rebuild is done)."""
        split = "val" if is_val(piece.doc, self.config.val_fraction) else "train"
        if piece.last:
            tokens = np.concatenate([tokens, self.eot])
        room = self.limit - self.total
        if len(tokens) > room:
            tokens = tokens[:int(room)]
        if len(tokens):
            if split not in self.writers:
                name = SHARD_NAME.format(split=split, part=len(self.progress.parts))
                keep = self.rebuild is None or name in self.rebuild.damaged
                self.writers[split] = ShardWriter(self.out / name, self.dtype, keep=keep)
            self.writers[split].write(tokens)
            count = self.counts[split]
            if count.last_doc != piece.doc:
                count.documents += 1
                count.last_doc = piece.doc
            count.tokens += len(tokens)
            self.total += len(tokens)
            self.part_tokens += len(tokens)
        self.pieces += 1
        if self.total >= self.limit:
            return False
        if self.part_tokens >= self.config.shard_tokens:
            self.close_part()
        return not self.done

    def close_part(self) -> None:
        """Rename the part's shards complete and record the part (no-op when it is empty)."""
        if not self.writers:
            return
        if self.rebuild is not None:
            for writer in self.writers.values():
                self.rebuild.check(writer)
        shards = tuple((split, self.writers[split].close()) for split in ("train", "val") if split in self.writers)
        self.writers = {}
        fsync_dir(self.out)
        record = PartRecord(pieces=self.pieces, tokens=self.total, splits=copy.deepcopy(self.counts), shards=shards)
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
    parse_tokenizer_spec(config.tokenizer)
    corpus = open_corpus(config.sources, config.text_field)
    out = Path(config.out)
    check_ownership(out)  # before anything reads the corpus or writes
    finished = (out / MANIFEST_FILE).is_file()
    head = None if finished else _read_head(corpus, config.val_fraction)
    with OutputLock(out, read_only_ok=finished) as lock:
        state = inspect_output(out, config.output_args())
        if state.manifest is not None:
            return _check_finished(out, config, corpus, state.manifest, lock)
        lock.require_writable()
        return _prepare_into(out, config, corpus, state.progress, head or _read_head(corpus, config.val_fraction))


def _check_finished(out: Path, config: PrepareConfig, corpus: Corpus, manifest: Manifest,
                    lock: OutputLock) -> PrepareResult:
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
    remove_stale_files(out, {s.file for split in manifest.splits.values() for s in split.shards})
    if manifest.tokenizer.file in damaged:
        _rebuild_tokenizer(out, config, corpus, manifest)
    shards = frozenset(damaged) - {manifest.tokenizer.file}
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
    """File name -> what is wrong with it, for every shard and the tokenizer file of a finished directory."""
    damaged = {problem.file: problem.problem for problem in check_data(out, manifest, "first").problems}
    tokenizer = out / manifest.tokenizer.file
    if not tokenizer.is_file():
        damaged[tokenizer.name] = "missing"
    elif (digest := sha256_file(tokenizer)) != manifest.tokenizer.sha256:
        damaged[tokenizer.name] = (f"sha256 {digest[:12]}... differs from the manifest's "
                                   f"{manifest.tokenizer.sha256[:12]}...")
    return damaged


def _rebuild_tokenizer(out: Path, config: PrepareConfig, corpus: Corpus, manifest: Manifest) -> None:
    enc = build_tokenizer(config.tokenizer, corpus, config.bpe_sample_chars)
    if tokenizer_info(enc).sha256 != manifest.tokenizer.sha256:
        raise DataError(f"{out / manifest.tokenizer.file}: building {config.tokenizer} again gives another "
                        "tokenizer than the manifest records (the corpus or the library changed), so it cannot be "
                        f"rebuilt; hint: delete {out} and prepare it again")
    save_tokenizer(enc, out)


def _rebuild_shards(out: Path, config: PrepareConfig, corpus: Corpus, manifest: Manifest,
                    damaged: frozenset[str]) -> None:
    """Re-encode from the part of the first damaged shard (from the start with a manifest that does not
    record its parts) through the part of the last one, writing the damaged shards only."""
    parts = sorted(part_number(name) for name in damaged)
    finished = Progress.from_manifest(manifest)
    start = parts[0] if finished is not None else 0
    progress = Progress(created_at=manifest.created_at, source=manifest.source, args=manifest.args,
                        tokenizer=manifest.tokenizer, dtype=manifest.dtype,
                        parts=finished.parts[:start] if finished is not None else ())
    log.info("%s: re-encoding parts %d to %d", out, start, parts[-1])
    expected = {shard.file: shard for split in manifest.splits.values() for shard in split.shards}
    writer = _PartWriter(out, progress, config, Rebuild(out, expected, damaged, parts[-1]))
    _encode(pieces(corpus.documents()), writer, config, corpus.n_documents)


def _prepare_into(out: Path, config: PrepareConfig, corpus: Corpus, progress: Progress | None,
                  head: tuple[list[Piece], Iterator[Piece]]) -> PrepareResult:
    """Build the tokenizer (or check the saved one), encode the pieces after the kept parts, write the manifest."""
    if progress is None:
        info = save_tokenizer(build_tokenizer(config.tokenizer, corpus, config.bpe_sample_chars), out)
        progress = Progress(created_at=created_at(), source=corpus.description, args=config.output_args(),
                            tokenizer=info, dtype=dtype_for_vocab(info.n_vocab).name)
        progress.save(out)
    else:
        load_saved_tokenizer(progress.tokenizer, out)  # refuses a tokenizer file that changed
        log.info("resuming %s: keeping %d completed part(s) (%d tokens)", out, len(progress.parts),
                 progress.parts[-1].tokens if progress.parts else 0)
    remove_stale_files(out, {shard.file for part in progress.parts for _, shard in part.shards})

    writer = _PartWriter(out, progress, config)
    start_tokens, resumed_parts = writer.total, len(progress.parts)
    start = time.perf_counter()
    documents = _encode(chain(*head), writer, config, corpus.n_documents)
    seconds = time.perf_counter() - start

    manifest = writer.progress.manifest()
    if config.val_fraction > 0 and not manifest.splits["val"].documents:
        raise _no_validation_document(config, out, manifest)
    write_atomic(out / MANIFEST_FILE, manifest.to_json().encode())
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    fsync_dir(out)
    result = PrepareResult(out, manifest, resumed_parts=resumed_parts, tokens=writer.total - start_tokens,
                           documents=documents, seconds=seconds)
    log.info("prepared %s in %.1fs (%s tokens/s): %s", out, seconds, f"{result.tokens / max(seconds, 1e-9):,.0f}",
             _summary(manifest))
    return result


HEAD_PIECES = 16
"""Pieces (of at most 1M characters each) read before anything is written, to see a second document."""


def _read_head(corpus: Corpus, val_fraction: float) -> tuple[list[Piece], Iterator[Piece]]:
    """The corpus' first pieces (through the first piece of document 1, at most HEAD_PIECES) and the rest.

    Refused here, before anything is written: an empty corpus, and a single document when a
    validation split is asked for (it needs a second document, see `shards.is_val`).
    """
    stream = pieces(corpus.documents())
    head: list[Piece] = []
    for piece in stream:
        head.append(piece)
        if piece.doc >= 1 or len(head) >= HEAD_PIECES:
            break
    if not head:
        raise DataError(f"empty corpus: {corpus.description} yielded no text; hint: check the --source paths "
                        "and --text-field")
    if val_fraction > 0 and head[-1].doc == 0 and len(head) < HEAD_PIECES:
        raise DataError(f"{corpus.description}: 1 document, too few for a validation split (--val-fraction "
                        f"{val_fraction:g}); hint: add documents, or pass --val-fraction 0 for no validation split")
    return head, stream


def _no_validation_document(config: PrepareConfig, out: Path, manifest: Manifest) -> DataError:
    """The error for a finished stream without a validation document (its parts stay, unfinished)."""
    if config.max_tokens is not None and manifest.splits["train"].tokens >= config.max_tokens:
        cause = f"--max-tokens {config.max_tokens} ends inside the first document"
        fix = "raise --max-tokens"
    else:
        cause = f"the corpus has {manifest.splits['train'].documents} document(s)"
        fix = "add documents"
    return DataError(f"{out}: {cause}: no validation document for --val-fraction {config.val_fraction:g}; "
                     f"hint: {fix}, or delete {out} and pass --val-fraction 0 for no validation split")


def prepare_default(out: Path = DEFAULT_OUT) -> PrepareResult:
    """The built-in offline corpus with the default tokenizer (what `python -m data_prep` does), all CPUs."""
    return prepare(PrepareConfig(out=Path(out), workers=os.cpu_count() or 1))


def _encode(stream: Iterator[Piece], writer: _PartWriter, config: PrepareConfig, n_documents: int | None) -> int:
    """Tokenize the pieces after those already written, in parallel, into `writer`; documents finished."""
    in_tokens = config.max_tokens is not None  # the bar counts tokens towards the cap, else documents
    start, start_tokens, documents = time.perf_counter(), writer.total, 0
    try:
        # the workers start (fork) before the bar, whose monitor thread they need not inherit
        with ParallelEncoder(config.workers, writer.out, writer.progress.tokenizer, writer.dtype) as encoder, \
                tqdm(total=config.max_tokens if in_tokens else n_documents, initial=writer.total if in_tokens else 0,
                     unit="tok" if in_tokens else "doc", unit_scale=True, dynamic_ncols=True, desc="tokenizing",
                     disable=None if config.progress_bar else True) as bar:  # None: off when not a terminal
            for batch, tokens, lengths in encoder.map(batches(islice(stream, writer.pieces, None))):
                before, going = writer.total, True
                for piece, end, length in zip(batch, np.cumsum(lengths).tolist(), lengths.tolist()):
                    going = writer.add(piece, tokens[end - length:end])
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
