"""The tokenizer of a preparation run: a standard encoding, a `.tiktoken` file, `bpe:N` trained on the corpus, or
the tokenizer of a model (`--tokenizer-from`: copied as is).

    enc = build_tokenizer("bpe:4096", corpus, sample_chars=1 << 25)
    base = tokenizer_from("runs/tiny")      # data dir, run dir, checkpoints/step_N or export; hash checked
    base = tokenizer_from("DeepSeek-V3")    # a transformers directory: the model's own tokenizer files
    info = base.copy_to(out)                # the same files, the same sha256

`bpe:N` trains on the first `sample_chars` characters; when they support fewer than N tokens the
tokenizer is named `bpe:M` after its real size M (with a warning), so that a name never overstates
the vocabulary; N is at most `MAX_BPE_VOCAB`. It trains in a child process: HF `tokenizers`' trainer
runs native code that does not look at signals until it returns (many seconds), so Ctrl-C reaches
the parent, which ends the child at once and raises KeyboardInterrupt. The child ignores SIGINT
(the parent owns the interruption) and dies with the parent, also when the parent is killed (Linux).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from data_prep.encode import pieces
from data_prep.sources import Corpus
from gpt_moe.atomic import write_atomic
from gpt_moe.checkpoint.model_dir import locate, read_tokenizer_record
from gpt_moe.data.chat_template import model_template, special_id
from gpt_moe.data.manifest import MANIFEST_FILE, Manifest
from gpt_moe.data.published_tokenizer import read_published
from gpt_moe.data.tokenizer import (CHAT_TOKENS, ENDOFTEXT, TOKENIZER_FILE, TokenizerInfo, bpe_encoding,
                                    load_saved_tokenizer, load_tokenizer, mergeable_ranks, parse_tokenizer_spec,
                                    train_bpe)
from gpt_moe.data.tokenizer_format import Tokenizer, copy_tokenizer_files
from gpt_moe.errors import CheckpointError, DataError, GptMoeError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def build_tokenizer(spec: str, corpus: Corpus, sample_chars: int) -> tiktoken.Encoding:
    """The Encoding for `--tokenizer spec` (bpe:N: trained on the corpus' first `sample_chars` characters)."""
    parsed = parse_tokenizer_spec(spec)
    if parsed.kind != "bpe":
        return load_tokenizer(spec)
    log.info("training %s on up to %.1fM characters of the corpus", spec, sample_chars / 1e6)
    start = time.perf_counter()
    ranks = _train_in_child(corpus, parsed.vocab_size, sample_chars)
    enc = bpe_encoding(ranks, name=spec)
    if enc.n_vocab < parsed.vocab_size:  # the name says the size: bpe:N names N tokens
        enc = bpe_encoding(ranks, name=f"bpe:{enc.n_vocab}")
        log.warning("--tokenizer %s: the corpus sample gave %d tokens, so the tokenizer is named %s after its real "
                    "size; hint: a larger corpus (or --bpe-sample-chars) gives more merges", spec, enc.n_vocab,
                    enc.name)
    log.info("trained %s: %d tokens in %.1fs", enc.name, enc.n_vocab, time.perf_counter() - start)
    return enc


# ------------------------------------------------------------------------------------------ --tokenizer-from
TOKENIZER_FROM_HINT = ("expected a prepared data directory (manifest.json), a training run or checkpoints/step_N "
                       "(tokenizer_info.json), an export (gpt_moe.json), each with its tokenizer file, or a "
                       "transformers model directory with its tokenizer (tokenizer.json or tiktoken.model)")


@dataclass(frozen=True)
class BaseTokenizer:
    """The tokenizer of a model or dataset: its record, the directory holding its files (hashes checked) and the
    tokenizer (ours: a tiktoken Encoding; a published model's own: `PublishedTokenizer`)."""

    info: TokenizerInfo
    directory: Path
    encoding: Tokenizer
    where: str  # "--tokenizer-from PATH" (the directory its record came from, for messages)

    def copy_to(self, out: Path) -> TokenizerInfo:
        """Write the same files into `out` (atomically, unchanged); its record, naming the files there."""
        if self.info.published:
            copy_tokenizer_files(self.info, self.directory, Path(out))
            return self.info
        write_atomic(Path(out) / TOKENIZER_FILE, (self.directory / self.info.file).read_bytes())
        return dataclasses.replace(self.info, file=TOKENIZER_FILE)


def _tokenizer_record(path: Path, where: str) -> tuple[TokenizerInfo, Path]:
    """(the tokenizer record, the directory holding its files) of a data directory, of a model
    (`gpt_moe.checkpoint.model_dir.locate`: a run, a checkpoint tag, an export or a transformers directory) or of a
    directory holding a published tokenizer's files alone."""
    if (path / MANIFEST_FILE).is_file():
        return Manifest.load(path).tokenizer, path
    try:
        directory, kind = locate(path)
        record = read_tokenizer_record(directory, kind)
    except CheckpointError:
        directory, kind, record = path, None, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: {path} is unreadable ({type(e).__name__}: {e}); {TOKENIZER_FROM_HINT}") from None
    if kind is None and (found := read_published(path)) is not None:
        record = found[1]
    if record is None:
        note = (" (this transformers directory ships no tokenizer: add the model's tokenizer files, or pass the data "
                "directory or checkpoint the model was trained with)" if kind == "transformers" else "")
        raise DataError(f"{where}: no tokenizer record here; {TOKENIZER_FROM_HINT}{note}")
    return record, directory


def tokenizer_from(path: str | Path) -> BaseTokenizer:
    """The tokenizer of a prepared data directory, a training checkpoint (a run directory: its newest complete
    checkpoint; or a checkpoints/step_N tag), an export or a transformers model directory (its own tokenizer files);
    DataError (one line) when there is none or its files do not match its record."""
    path, where = Path(path), f"--tokenizer-from {path}"
    if not path.is_dir():
        raise DataError(f"{where}: no such directory; {TOKENIZER_FROM_HINT}")
    info, directory = _tokenizer_record(path, where)
    try:
        encoding = load_saved_tokenizer(info, directory)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    return BaseTokenizer(info, directory, encoding, where)


def require_chat_format(encoding: Tokenizer, where: str) -> None:
    """DataError (one line, naming `where`) unless conversations can be rendered: ours needs `<|endoftext|>` and
    every chat marker; a published model its own chat template, proved on a probe conversation (the loss mask from
    `{% generation %}`, or prefixes that are stable)."""
    try:
        template = model_template(encoding)
        if template is not None:
            template.check()
            return
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    for token in (ENDOFTEXT, *CHAT_TOKENS):
        try:
            special_id(encoding, token)
        except DataError as e:
            raise DataError(f"{where}: {e}; chat data needs {ENDOFTEXT} and the markers {' '.join(CHAT_TOKENS)}") \
                from None


# ------------------------------------------------------------------------------------------ BPE training


def _sample(corpus: Corpus, limit_chars: int) -> Iterator[str]:
    """The first `limit_chars` characters of the corpus, as pieces."""
    seen = 0
    for piece in pieces(corpus.documents()):
        yield piece.text
        seen += len(piece.text)
        if seen >= limit_chars:
            return


def _train_in_child(corpus: Corpus, vocab_size: int, sample_chars: int) -> dict[bytes, int]:
    """The mergeable ranks of a BPE trained in a child process; its DataError is raised here as is."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, corpus, vocab_size, sample_chars, os.getpid()),
                            name="bpe-training")
    # SIGINT stays blocked in the child until it has chosen to ignore it (the mask survives fork and exec)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    send.close()
    try:
        kind, payload = receive.recv()
    except BaseException as e:  # Ctrl-C, or EOFError: the child died without a word
        child.terminate()
        child.join()
        if isinstance(e, EOFError):
            raise RuntimeError(f"BPE training process ended without a result (exit code {child.exitcode})") from None
        raise
    finally:
        receive.close()
    child.join()
    if kind == "ranks":
        return payload
    if kind == "error":
        raise payload
    raise RuntimeError(f"BPE training failed in its process:\n{payload}")


def _child(send, corpus: Corpus, vocab_size: int, sample_chars: int, parent: int) -> None:
    """The training process: sends ("ranks", ranks), ("error", GptMoeError) or ("bug", traceback text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent(parent)
    try:
        result = ("ranks", mergeable_ranks(train_bpe(_sample(corpus, sample_chars), vocab_size)))
    except GptMoeError as e:
        result = ("error", e)
    except Exception:  # a bug: its traceback goes to the parent, which raises it
        result = ("bug", traceback.format_exc())
    send.send(result)
    send.close()


def _die_with_parent(parent: int) -> None:
    """On Linux, the kernel ends this process when its parent (pid `parent`) dies, even by SIGKILL."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)
