"""The output directory's state: a run's progress record, resume checks, the final manifest.

While a preparation runs, `progress.json` (rewritten atomically after every part) records
the arguments, the tokenizer and the completed parts. A rerun of the same command keeps
the parts whose shards still match their size and sha256 and continues after the last
one; the finished run writes `manifest.json` (with each part's position) and removes
`progress.json`. A directory with a manifest is complete: the same command verifies it and
rebuilds damaged shards from those positions (`pipeline`), another tokenizer or other
arguments are refused. data_prep writes only into a new or empty directory or one it
made (`check_ownership`), and deletes only files of its own names in one it made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.chat_rows import BAD_ROW_KINDS
from data_prep.lock import LOCK_FILE
from data_prep.shards import SHARD_FILE
from gpt_moe.atomic import TEMP_NAME, write_atomic
from gpt_moe.data.manifest import (MANIFEST_FILE, PROGRESS_FILE, SPLITS, ChatInfo, ChatSplit, Manifest, ShardInfo,
                                   SplitInfo, sha256_file)
from gpt_moe.data.published_tokenizer import MODEL_TOKENIZER_FILES
from gpt_moe.data.tokenizer import TOKENIZER_FILE, TokenizerInfo
from gpt_moe.data.verify import RECORD_FILE
from gpt_moe.errors import DataError

log = logging.getLogger(__name__)

_OUR_TEMPORARY_FILES = {TOKENIZER_FILE, *MODEL_TOKENIZER_FILES, PROGRESS_FILE, MANIFEST_FILE, RECORD_FILE}


def _is_ours(name: str) -> bool:
    """A shard, or the temporary file of a shard, a tokenizer file, the progress record, the manifest or the
    verification record."""
    temp = TEMP_NAME.match(name)
    final = temp["name"] if temp else name
    return bool(SHARD_FILE.match(final)) or (temp is not None and final in _OUR_TEMPORARY_FILES)


@dataclass
class SplitCount:
    """Running totals of one split: documents with >= 1 token here, tokens, last document index, and (chat
    data) trained tokens."""

    documents: int = 0
    tokens: int = 0
    last_doc: int = -1
    trained_tokens: int = 0


@dataclass
class SkippedRows:
    """Chat data: bad rows skipped so far, a count per kind and the first `FIRST` `where: problem` of each."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)

    FIRST = 5

    def add(self, kind: str, where: str, problem: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.first.setdefault(kind, [])
        if len(shown) < self.FIRST:
            shown.append(f"{where}: {problem}")

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "first": {k: list(v) for k, v in self.first.items()}}

    @classmethod
    def from_dict(cls, data: dict | None) -> SkippedRows:
        data = data or {}
        return cls({str(k): int(v) for k, v in data.get("counts", {}).items()},
                   {str(k): [str(w) for w in v] for k, v in data.get("first", {}).items()})


@dataclass(frozen=True)
class PartRecord:
    """A completed part: cumulative counters after it and its own shards."""

    pieces: int  # pieces consumed from the start of the stream
    tokens: int  # tokens written, all splits
    splits: dict[str, SplitCount]
    shards: tuple[tuple[str, ShardInfo], ...]  # (split, shard)
    skipped: SkippedRows | None = None  # chat data: bad rows skipped up to here

    def position(self) -> dict:
        """Where the stream stands after this part: what resuming (or rebuilding) after it needs."""
        splits = {k: asdict(v) for k, v in self.splits.items()}
        if self.skipped is None:  # text data: as before chat data existed
            splits = {k: {f: n for f, n in v.items() if f != "trained_tokens"} for k, v in splits.items()}
        position = {"pieces": self.pieces, "tokens": self.tokens, "splits": splits}
        return position if self.skipped is None else {**position, "skipped": self.skipped.to_dict()}

    @classmethod
    def from_position(cls, data: dict, shards: tuple[tuple[str, ShardInfo], ...]) -> PartRecord:
        """Inverse of `position()` with the part's shards; KeyError, TypeError or ValueError when malformed."""
        skipped = SkippedRows.from_dict(data["skipped"]) if "skipped" in data else None
        return cls(pieces=int(data["pieces"]), tokens=int(data["tokens"]),
                   splits={k: SplitCount(**v) for k, v in data["splits"].items()}, shards=shards, skipped=skipped)


@dataclass(frozen=True)
class Progress:
    """progress.json: what a preparation in flight has completed."""

    created_at: str
    source: str
    args: dict
    tokenizer: TokenizerInfo
    dtype: str
    parts: tuple[PartRecord, ...] = field(default_factory=tuple)
    chat_template: str | None = None  # chat data: sha256 of the template it is rendered with

    @property
    def content(self) -> str:
        return str(self.args.get("format", "text"))

    def to_json(self) -> str:
        data = {"created_at": self.created_at, "source": self.source, "args": self.args,
                "tokenizer": self.tokenizer.to_dict(), "dtype": self.dtype,
                "parts": [{**p.position(), "shards": [{"split": split, **shard.to_dict()} for split, shard in p.shards]}
                          for p in self.parts]}
        if self.chat_template is not None:
            data["chat_template"] = self.chat_template
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, directory: Path) -> Progress:
        path = Path(directory) / PROGRESS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            parts = tuple(PartRecord.from_position(p, tuple((s["split"], ShardInfo.from_dict(s)) for s in p["shards"]))
                          for p in data["parts"])
            return cls(created_at=data["created_at"], source=data["source"], args=data["args"],
                       tokenizer=TokenizerInfo.from_dict(data["tokenizer"], str(path)), dtype=data["dtype"],
                       parts=parts, chat_template=data.get("chat_template"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: unreadable progress record ({type(e).__name__}: {e}); "
                            f"hint: delete {path.parent} and prepare again") from None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Progress | None:
        """The record of the finished run that wrote `manifest` (from its `parts`), or None when the manifest
        has no usable one (written before data_prep kept it)."""
        shards = {s.file: (name, s) for name, split in manifest.splits.items() for s in split.shards}
        try:
            parts = tuple(PartRecord.from_position(p, tuple(shards[f] for f in p["files"])) for p in manifest.parts)
        except (KeyError, TypeError, ValueError):
            return None
        if sum(len(part.shards) for part in parts) != len(shards) or (shards and not parts):
            return None
        return cls(created_at=manifest.created_at, source=manifest.source, args=manifest.args,
                   tokenizer=manifest.tokenizer, dtype=manifest.dtype, parts=parts,
                   chat_template=manifest.chat.template_sha256 if manifest.chat else None)

    def save(self, directory: Path) -> None:
        write_atomic(Path(directory) / PROGRESS_FILE, self.to_json().encode())

    def manifest(self) -> Manifest:
        """The manifest of the finished run (with each part's position, for rebuilding a damaged shard)."""
        counts = self.parts[-1].splits if self.parts else {}
        splits = {}
        for name in SPLITS:
            count = counts.get(name, SplitCount())
            shards = tuple(shard for part in self.parts for split, shard in part.shards if split == name)
            splits[name] = SplitInfo(documents=count.documents, tokens=count.tokens, shards=shards)
        parts = tuple({**part.position(), "files": [shard.file for _, shard in part.shards]} for part in self.parts)
        return Manifest(created_at=self.created_at, source=self.source, args=self.args, tokenizer=self.tokenizer,
                        dtype=self.dtype, splits=splits, parts=parts, content=self.content, chat=self._chat_info())

    def _chat_info(self) -> ChatInfo | None:
        """The manifest's chat section (None for text data): totals and skipped rows after the last part."""
        if self.content != "chat":
            return None
        last = self.parts[-1] if self.parts else None
        counts = last.splits if last else {}
        skipped = (last.skipped if last else None) or SkippedRows()
        splits = {name: ChatSplit(count.documents, count.tokens, count.trained_tokens)
                  for name, count in ((n, counts.get(n, SplitCount())) for n in SPLITS)}
        return ChatInfo(template_sha256=str(self.chat_template), max_seq_len=int(self.args["max_seq_len"]),
                        splits=splits, skipped={kind: skipped.counts.get(kind, 0) for kind in BAD_ROW_KINDS},
                        skipped_first={kind: list(skipped.first[kind]) for kind in BAD_ROW_KINDS
                                       if kind in skipped.first}, ends_marked=self.tokenizer.published)


@dataclass(frozen=True)
class OutputState:
    """What an output directory holds for the requested arguments."""

    manifest: Manifest | None = None  # set: already prepared with these arguments
    progress: Progress | None = None  # set: a run to resume (only verified parts kept)


def _normalized(args: dict) -> dict:
    return json.loads(json.dumps(args))


NOT_COMPARED = ("tokenizer_from",)
"""Arguments a rerun may spell differently: --tokenizer-from is compared by the tokenizer's sha256 instead (the
same tokenizer read from another path makes the same data), see `check_tokenizer`."""


def _check_same(out: Path, recorded: dict, requested: dict, what: str) -> None:
    held, asked = recorded.get("format", "text"), requested.get("format", "text")
    if held != asked:
        raise DataError(f"{out} already holds {what} of {held} data; refusing to add {asked} data (--format "
                        f"{asked}) to it; hint: choose another --out for the {asked} data")
    if recorded.get("tokenizer") != requested.get("tokenizer"):
        raise DataError(f"{out} already holds {what} tokenized with {recorded.get('tokenizer')!r}; refusing to mix in "
                        f"--tokenizer {requested.get('tokenizer')!r}; hint: choose another --out or delete {out}")
    keys = sorted((set(recorded) | set(requested)) - set(NOT_COMPARED))
    differing = [k for k in keys if recorded.get(k) != requested.get(k)]
    if differing:
        k = differing[0]
        raise DataError(f"{out} already holds {what} prepared with other arguments ({k}: {recorded.get(k)!r}, "
                        f"now {requested.get(k)!r}); hint: rerun with the original arguments, "
                        f"or choose another --out or delete {out}")


def check_tokenizer(out: Path, recorded: TokenizerInfo, requested: TokenizerInfo | None, source: str) -> None:
    """Refuse to mix another tokenizer (`requested`, read from `source`) into a directory holding `recorded`'s."""
    if requested is not None and requested.sha256 != recorded.sha256:
        raise DataError(f"{out} already holds data tokenized with {recorded.name} (sha256 {recorded.sha256[:12]}...); "
                        f"refusing to mix in the tokenizer of {source}, {requested.name} (sha256 "
                        f"{requested.sha256[:12]}...); hint: choose another --out or delete {out}")


def check_template(out: Path, recorded: str | None, requested: str | None) -> None:
    """Refuse to resume chat data rendered with another chat template (ours changed since, or the model's own)."""
    if requested is not None and recorded != requested:
        raise DataError(f"{out} holds conversations rendered with another chat template (sha256 "
                        f"{str(recorded)[:12]}..., now {requested[:12]}...); hint: delete {out} and prepare it again")


def _part_intact(out: Path, part: PartRecord, itemsize: int) -> bool:
    for _, shard in part.shards:
        for name, size, sha256 in shard.files(itemsize):
            path = out / name
            if not path.is_file() or path.stat().st_size != size or sha256_file(path) != sha256:
                log.warning("%s does not match its record; preparing again from there", path)
                return False
    return True


OWN_MARKERS = (MANIFEST_FILE, PROGRESS_FILE, LOCK_FILE)
"""Files that make a directory data_prep's: it writes only into a new or empty directory or one holding one
(the lock file, taken only in such a directory, also covers a run stopped before its progress record)."""


def check_ownership(out: Path) -> None:
    """Refuse an `--out` that exists and is not a directory, or is neither empty nor made by data_prep."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory; hint: choose another --out")
    names = sorted(path.name for path in out.iterdir())
    if names and not any(name in OWN_MARKERS for name in names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise DataError(f"--out {out}: not empty ({shown}) and not made by data_prep (no {MANIFEST_FILE} or "
                        f"{PROGRESS_FILE}); refusing to write there; hint: choose a new or empty directory")


def inspect_output(out: Path, args: dict) -> OutputState:
    """Compare an output directory that `check_ownership` allows with the requested `args` (see the module
    docstring)."""
    out = Path(out)
    requested = _normalized(args)
    if (out / MANIFEST_FILE).is_file():
        manifest = Manifest.load(out)
        _check_same(out, manifest.args, requested, "a prepared dataset")
        return OutputState(manifest=manifest)
    if (out / PROGRESS_FILE).is_file():
        progress = Progress.load(out)
        _check_same(out, progress.args, requested, "an unfinished preparation")
        itemsize = 2 if progress.dtype == "uint16" else 4
        kept: list[PartRecord] = []
        for part in progress.parts:
            if not _part_intact(out, part, itemsize):
                break
            kept.append(part)
        return OutputState(progress=dataclasses.replace(progress, parts=tuple(kept)))
    return OutputState()


def remove_stale_files(out: Path, keep: set[str]) -> None:
    """Delete our temporary files and the shard files not in `keep` (ours only, by name, in a directory
    `check_ownership` allows)."""
    for path in Path(out).iterdir():
        if _is_ours(path.name) and path.name not in keep:
            path.unlink()
