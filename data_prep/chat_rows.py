"""Where conversations come from (`--format chat`): the `--source` values read as rows, each row checked and
turned into one conversation, or into a bad row that is skipped and counted by kind.

    builtin-chat             conversations generated from the standard library (`data_prep.builtin_chat`);
                             the source decides the split (held-out modules)
    hf:NAME[:CONFIG][@SPLIT] a Hugging Face dataset, streamed; rows are named `hf:NAME@SPLIT row N` (from 0)
    PATH | GLOB | DIR        .jsonl / .json: JSON lines, read here line by line so that a line that is not JSON
                             is one bad row named `PATH:LINE` (a .json file whose first character is `[` is
                             one JSON array instead, its rows named `PATH item N`); .parquet: read in record
                             batches, rows named `PATH row N` (from 0)

A row holds `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (`--messages-field`
names another field), or `{"prompt": "...", "completion": "..."}`: one user turn and one assistant turn. Other
keys, and other keys of a message, are ignored. A bad row is one of `BAD_ROW_KINDS`; the kinds found here are
all but "too_long", which the pipeline finds once the conversation is rendered into tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from data_prep.builtin_chat import BuiltinChatSource
from data_prep.sources import (_JSON_KINDS, CHAT_BUILTIN, HubDataset, Row, SourceList, _describe_files, _expand,
                               refuse_evaluation_data)
from gpt_moe.data.chat_template import ROLE_MARKERS
from gpt_moe.errors import DataError, first_line

BAD_ROW_KINDS: dict[str, str] = {
    "not_json": "not JSON", "no_messages": "no messages", "unknown_role": "unknown role",
    "non_string_content": "non-string content", "no_assistant_turn": "no assistant turn", "too_long": "too long"}
"""Kinds of bad rows (manifest key -> what the report calls them), in report order."""
CHAT_SOURCE_HINT = ("expected 'builtin-chat', 'hf:NAME[:CONFIG][@SPLIT]', or existing .jsonl/.json/.parquet files, "
                    "directories or globs of chat rows")


@dataclass(frozen=True)
class NotJson:
    """A line that did not parse: what was wrong with it."""

    detail: str


@dataclass(frozen=True)
class ChatPiece:
    """One row of the conversation stream, good or bad (a bad row keeps its place, so that resuming counts it).

    `doc` numbers the rows of the whole stream; `messages` is the conversation ({"role", "content"} dicts)
    or None with `problem` (a `BAD_ROW_KINDS` key) and `detail` (what is wrong, one line)."""

    doc: int
    where: str
    messages: tuple[dict[str, str], ...] | None
    problem: str | None = None
    detail: str = ""
    split: str | None = None
    last: bool = True  # a conversation is never cut: every piece ends its document

    @property
    def size(self) -> int:
        """Characters of text, for batching."""
        return sum(len(m["content"]) for m in self.messages) if self.messages else 0


# ------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class JsonRows:
    """Local JSON-lines files (or JSON arrays), read here so that every line that is not JSON is named."""

    paths: tuple[Path, ...]

    @property
    def description(self) -> str:
        return _describe_files("json", self.paths)

    @property
    def n_documents(self) -> int | None:
        return None

    def rows(self) -> Iterator[Row]:
        for path in self.paths:
            yield from (_json_array(path) if _first_character(path) == "[" else _json_lines(path))


def _first_character(path: Path) -> str:
    with open(path, "rb") as f:
        while block := f.read(4096):
            if stripped := block.lstrip():
                return stripped[:1].decode("latin-1")
    return ""


def _json_lines(path: Path) -> Iterator[Row]:
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    value = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    value = NotJson(f"not UTF-8 (byte {e.start} of the line: {e.reason})")
                except json.JSONDecodeError as e:
                    value = NotJson(f"not valid JSON ({e.msg} at column {e.colno})")
                yield Row(f"{path}:{lineno}", value)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _json_array(path: Path) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: a JSON array that does not parse ({type(e).__name__}: {first_line(e, 200)}); "
                        "hint: fix the file, or write one conversation per line (JSON lines)") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows or JSON lines")
    for index, value in enumerate(rows):
        yield Row(f"{path} item {index}", value)


@dataclass(frozen=True)
class ParquetRows:
    """Local parquet files, read in record batches."""

    paths: tuple[Path, ...]

    @property
    def description(self) -> str:
        return _describe_files("parquet", self.paths)

    @property
    def n_documents(self) -> int | None:
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.paths)

    def rows(self) -> Iterator[Row]:
        import pyarrow.parquet as pq
        for path in self.paths:
            try:
                index = 0
                for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                    for value in batch.to_pylist():
                        yield Row(f"{path} row {index}", value)
                        index += 1
            except (OSError, ValueError) as e:  # pyarrow's errors derive from these
                raise DataError(f"{path}: cannot read as parquet ({type(e).__name__}: {first_line(e, 200)}); "
                                "hint: check that the file is valid parquet") from None


@dataclass(frozen=True)
class HubRows:
    """A Hugging Face Hub dataset of chat rows, streamed."""

    hub: HubDataset

    @property
    def description(self) -> str:
        return self.hub.spec

    @property
    def n_documents(self) -> int | None:
        return None

    def rows(self) -> Iterator[Row]:
        for index, value in enumerate(self.hub.stream()):
            yield Row(f"{self.description} row {index}", value)


@dataclass(frozen=True)
class ChatCorpus(SourceList):
    """Chat sources: their rows, one source after another."""

    @property
    def decides_split(self) -> bool:
        """Whether the sources decide which conversations are held out (then --val-fraction does not apply)."""
        return all(getattr(part, "decides_split", False) for part in self.parts)

    def rows(self) -> Iterator[Row]:
        return chain.from_iterable(part.rows() for part in self.parts)


def open_chat_corpus(specs: Iterable[str]) -> ChatCorpus:
    """Resolve `--source` values of chat data; DataError naming the first one that is not a chat source."""
    parts: list = []
    for spec in specs:
        refuse_evaluation_data(spec)
        if spec == CHAT_BUILTIN:
            parts.append(BuiltinChatSource.discover())
        elif spec == "builtin":
            raise DataError(f"--source builtin is the text corpus; hint: for chat data use --source {CHAT_BUILTIN}")
        elif spec.startswith("hf:"):
            parts.append(HubRows(HubDataset.parse(spec, "")))
        else:
            files = _expand(str(Path(spec).expanduser()))
            if not files:
                raise DataError(f"unknown source {spec!r}: no such file, directory or glob match; {CHAT_SOURCE_HINT}")
            refuse_evaluation_data(spec, files)
            parts.extend(_file_parts(spec, files))
    if not parts:
        raise DataError(f"no --source given; {CHAT_SOURCE_HINT}")
    return ChatCorpus(tuple(parts))


def _file_parts(spec: str, files: list[Path]) -> list:
    """Consecutive files of the same kind become one source part (file order is kept)."""
    parts: list[tuple[type, list[Path]]] = []
    for path in files:
        kind = {".jsonl": JsonRows, ".json": JsonRows, ".parquet": ParquetRows}.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"source {spec!r}: {path} is not a file of chat rows ({path.suffix or 'no suffix'}); "
                            f"{CHAT_SOURCE_HINT}")
        if parts and parts[-1][0] is kind:
            parts[-1][1].append(path)
        else:
            parts.append((kind, [path]))
    return [kind(tuple(paths)) for kind, paths in parts]


# --------------------------------------------------------------------------------------- rows -> pieces


def _describe(value: object) -> str:
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    return "missing" if value is None else f"a JSON {kind}"


def conversation(value: object, field: str, roles: Sequence[str]) -> tuple[tuple[dict[str, str], ...] | None,
                                                                           str | None, str]:
    """(messages, None, "") of a good row; (None, bad-row kind, what is wrong) of a bad one."""
    if isinstance(value, NotJson):
        return None, "not_json", value.detail
    if not isinstance(value, dict):
        return None, "not_json", f"{_describe(value)}, expected an object"
    messages = value.get(field)
    if field not in value and ("prompt" in value or "completion" in value):
        for name in ("prompt", "completion"):
            if not isinstance(value.get(name), str):
                return None, "non_string_content", f"{name} is {_describe(value.get(name))}, expected a string"
        messages = [{"role": "user", "content": value["prompt"]}, {"role": "assistant", "content": value["completion"]}]
    if not isinstance(messages, list) or not messages:
        found = "empty" if isinstance(messages, list) else _describe(messages)
        return None, "no_messages", (f"field {field!r} is {found}, expected a list of messages (keys: "
                                     f"{', '.join(map(str, value)) or 'none'})")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return None, "no_messages", f"message {number} is {_describe(message)}, expected an object"
        if message.get("role") not in roles:
            return None, "unknown_role", (f"message {number} has role {message.get('role')!r}, expected one of "
                                          f"{', '.join(roles)}")
        if not isinstance(message.get("content"), str):
            return None, "non_string_content", (f"message {number} ({message['role']}) content is "
                                                f"{_describe(message.get('content'))}, expected a string")
    if not any(message["role"] == "assistant" for message in messages):
        return None, "no_assistant_turn", (f"no assistant message among {len(messages)} (roles: "
                                           f"{', '.join(m['role'] for m in messages)})")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages), None, ""


def chat_pieces(rows: Iterable[Row], field: str = "messages") -> Iterator[ChatPiece]:
    """Every row as a `ChatPiece`, numbered in stream order."""
    roles = tuple(ROLE_MARKERS)
    for doc, row in enumerate(rows):
        messages, problem, detail = conversation(row.value, field, roles)
        yield ChatPiece(doc, row.where, messages, problem, detail, row.split)


# ------------------------------------------------------------------------------------------------ reports


def bad_row_error(where: str, kind: str, detail: str) -> DataError:
    """The --strict error for the first bad row."""
    return DataError(f"{where}: {detail} (bad row: {BAD_ROW_KINDS[kind]}); --strict stops at the first bad row; "
                     "hint: fix or remove the row, or drop --strict to skip and count bad rows")


def skipped_report(counts: dict[str, int], first: dict[str, list[str]], shown: int = 3) -> str:
    """One line: the count of each kind of bad row with its first `shown` rows (`where: problem`)."""
    parts = []
    for kind, label in BAD_ROW_KINDS.items():
        if counts.get(kind):
            rows = "; ".join(first.get(kind, [])[:shown]) + ("; ..." if counts[kind] > shown else "")
            parts.append(f"{counts[kind]} {label} ({rows})")
    return ", ".join(parts)
