"""A published model's own tokenizer, read offline from its transformers directory and used wherever ours is.

    tokenizer, info = read_published(Path("DeepSeek-V3"))    # None when the directory ships no tokenizer
    tokenizer.encode_ordinary(text)                           # what data_prep writes (plus the document's ends)
    load_published(info, directory)                           # a copy of the files, every sha256 checked

Two vocabulary formats:

- `tokenizer.json` (HF `tokenizers`: DeepSeek-V2/V3/R1 and most models), read with the `tokenizers` library;
- `tiktoken.model` (tiktoken ranks, as Moonlight / Kimi ship), read with tiktoken: special tokens and their ids from
  `tokenizer_config.json`'s `added_tokens_decoder`, the split pattern from the tokenizer module the directory
  names in `auto_map` (its `pat_str`, read from the source without running it), else from `tokenizer_config.json`'s
  `pat_str`, else the pattern transformers itself gives a `tiktoken.model` (`TikTokenConverter`'s default).

The files the model ships (`MODEL_TOKENIZER_FILES` that exist, and the tokenizer module) are its identity
(`TokenizerInfo.files`, each by sha256) and are copied unchanged wherever the tokenizer goes. BOS and EOS are the
model's (`bos_token` / `eos_token` of `tokenizer_config.json`, or `special_tokens_map.json`): a document is
`document_prefix` (what the tokenizer adds before a text with add_special_tokens, e.g. DeepSeek's
`<｜begin▁of▁sentence｜>`), its ordinary ids, then the EOS token, which ends each document in token shards. Ids
equal transformers': `encode_ordinary(text)` is `AutoTokenizer(text, add_special_tokens=False,
split_special_tokens=True)` (text that spells a special token stays text), and `encode_with_special` is how
`apply_chat_template` tokenizes a rendered conversation (special tokens parsed).

The chat template (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`) is rendered by
`gpt_moe.data.model_chat_template`.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken

from gpt_moe.data.model_chat_template import ModelChatTemplate, template_text
from gpt_moe.data.tokenizer_format import TokenizerInfo, byte_level_alphabet, files_sha256, parse_tiktoken_file
from gpt_moe.errors import DataError, first_line

HF_TOKENIZER_JSON = "tokenizer.json"
TIKTOKEN_MODEL = "tiktoken.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_TOKENIZER_FILES = (HF_TOKENIZER_JSON, TIKTOKEN_MODEL, TOKENIZER_CONFIG, "special_tokens_map.json",
                         "chat_template.jinja", "chat_template.json", "added_tokens.json")
"""The tokenizer files a transformers directory may hold (besides a tokenizer module named in `auto_map`)."""
TRANSFORMERS_TIKTOKEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
"""The split pattern transformers gives a `tiktoken.model` when nothing else names one (`TikTokenConverter`)."""
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens transformers passes to a chat template (`special_tokens_map`)."""


class PublishedTokenizer:
    """A published model's tokenizer behind the `gpt_moe.data.tokenizer_format.Tokenizer` interface, with its
    BOS/EOS, its document prefix and its chat template (`chat`, None when the model has none)."""

    def __init__(self, name: str, backend: Any, config: dict, template: str | None):
        self.name = name
        self.backend = backend  # _TokenizersBackend or _TiktokenBackend
        self.n_vocab: int = backend.n_vocab
        self.special_tokens_set: set[str] = set(backend.special)
        self.named_tokens = {key: token for key in SPECIAL_TOKEN_KEYS if (token := _token_text(config.get(key)))}
        self.eot: int = self._named_id("eos_token")
        self.bos: int | None = self._named_id("bos_token") if "bos_token" in self.named_tokens else None
        self.document_prefix: tuple[int, ...] = backend.document_prefix()
        self.chat = ModelChatTemplate(self, template) if template is not None else None

    def _named_id(self, key: str) -> int:
        token = self.named_tokens.get(key)
        token_id = self.backend.token_id(token) if token is not None else None
        if token_id is None:
            raise DataError(f"tokenizer {self.name!r}: {TOKENIZER_CONFIG} names no {key} in the vocabulary "
                            f"({token!r}); expected the model's {key.split('_')[0].upper()} token")
        return token_id

    # -- the Tokenizer interface
    def encode_ordinary(self, text: str) -> list[int]:
        return self.backend.encode(text, special=False)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of rendered chat text, special tokens parsed (as `apply_chat_template` tokenizes)."""
        return self.backend.encode(text, special=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode_with_special` and each token's [start, end) character offsets in `text`."""
        return self.backend.encode_with_offsets(text)

    def encode_single_token(self, text_or_bytes: str | bytes) -> int:
        token = text_or_bytes.decode() if isinstance(text_or_bytes, bytes) else text_or_bytes
        token_id = self.backend.token_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.backend.token_bytes(token)

    def decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self.backend.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def document_ids(self, text: str) -> list[int]:
        """A whole document as token shards hold it: the prefix, the text, the EOS token."""
        return [*self.document_prefix, *self.encode_ordinary(text), self.eot]


class _TokenizersBackend:
    """tokenizer.json through HF `tokenizers`: one instance parses special-token text, one keeps it text."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.with_special = Tokenizer.from_file(str(path))
            self.ordinary = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library's parse error, in one line
            raise DataError(f"{path}: not a tokenizers tokenizer.json ({first_line(e)})") from None
        self.ordinary.encode_special_tokens = True
        added = self.with_special.get_added_tokens_decoder()
        self.special = {token.content: token_id for token_id, token in added.items() if token.special}
        self.added = {token_id: token.content for token_id, token in added.items()}
        self.n_vocab = max([*self.with_special.get_vocab(with_added_tokens=True).values(), -1]) + 1
        decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.alphabet = byte_level_alphabet()

    def encode(self, text: str, special: bool) -> list[int]:
        return (self.with_special if special else self.ordinary).encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.with_special.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def document_prefix(self) -> tuple[int, ...]:
        """The ids the post-processor adds before a text (add_special_tokens=True), e.g. BOS."""
        bare = self.ordinary.encode("a", add_special_tokens=False).ids
        full = self.ordinary.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return tuple(full[:start])
        return ()

    def token_id(self, token: str) -> int | None:
        return self.with_special.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        piece = self.with_special.id_to_token(token_id)
        if piece is None:  # a hole in the ids
            return b""
        if self.byte_level and all(ch in self.alphabet for ch in piece):
            return bytes(self.alphabet[ch] for ch in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
            return bytes([int(piece[3:5], 16)])
        return self.with_special.decode([token_id], skip_special_tokens=False).encode()


class _TiktokenBackend:
    """tiktoken.model through tiktoken, special tokens from tokenizer_config.json's added_tokens_decoder."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, special: dict[str, int]):
        try:
            self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        except ValueError as e:
            raise DataError(f"tokenizer {name!r}: tiktoken refuses it ({first_line(e)})") from None
        self.special, self.n_vocab = dict(special), self.encoding.n_vocab

    def encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text, special=True)
        _, starts = self.encoding.decode_with_offsets(ids)
        return ids, list(zip(starts, [*starts[1:], len(text)]))

    def document_prefix(self) -> tuple[int, ...]:
        return ()  # transformers' tiktoken tokenizer adds nothing around a text

    def token_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        try:
            return self.encoding.encode_single_token(token.encode())
        except KeyError:
            return None

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token_id)
        except KeyError:
            return b""


# ------------------------------------------------------------------------------------------ reading a directory


def tokenizer_files(directory: Path) -> dict[str, str]:
    """The tokenizer files of a transformers directory -> sha256 ({} when it ships no vocabulary)."""
    names = [name for name in MODEL_TOKENIZER_FILES if (directory / name).is_file()]
    if HF_TOKENIZER_JSON not in names and TIKTOKEN_MODEL not in names:
        return {}
    module = _tokenizer_module(_json_object(directory / TOKENIZER_CONFIG))
    if module is not None and (directory / module).is_file():
        names.append(module)
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in sorted(names)}


def read_published(directory: str | Path, name: str | None = None) -> tuple[PublishedTokenizer, TokenizerInfo] | None:
    """The tokenizer a transformers directory ships and its identity record; None when it ships none. DataError (one
    line, naming the file) for files that cannot be read as the model defines them."""
    directory = Path(directory)
    files = tokenizer_files(directory)
    if not files:
        return None
    tokenizer, pattern = _build(directory, name or directory.name)
    vocabulary = HF_TOKENIZER_JSON if HF_TOKENIZER_JSON in files else TIKTOKEN_MODEL
    special = {token: tokenizer.encode_single_token(token) for token in sorted(tokenizer.special_tokens_set)}
    info = TokenizerInfo(name=tokenizer.name, sha256=files_sha256(files), n_vocab=tokenizer.n_vocab,
                         eot_id=tokenizer.eot, pat_str=pattern, special_tokens=special, file=vocabulary,
                         format=vocabulary, files=files, document_prefix=tokenizer.document_prefix)
    return tokenizer, info


def load_published(info: TokenizerInfo, directory: str | Path) -> PublishedTokenizer:
    """The tokenizer `info` records, from its files in `directory` (each file's sha256 checked, then the record)."""
    directory = Path(directory)
    for name, digest in info.files.items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: missing; the tokenizer {info.name!r} needs its files {', '.join(info.files)} "
                            "(copied unchanged from the model's directory); hint: prepare the data again")
        found = hashlib.sha256(path.read_bytes()).hexdigest()
        if found != digest:
            raise DataError(f"{path}: sha256 {found[:12]}... differs from the recorded {digest[:12]}...; hint: the "
                            "tokenizer file was replaced; prepare the data again from the model's directory")
    tokenizer, _ = _build(directory, info.name)
    if (tokenizer.n_vocab, tokenizer.eot) != (info.n_vocab, info.eot_id):
        raise DataError(f"{directory}: the tokenizer files give n_vocab {tokenizer.n_vocab} and EOS id "
                        f"{tokenizer.eot}, the record {info.n_vocab} and {info.eot_id} (the library changed?)")
    return tokenizer


def _build(directory: Path, name: str) -> tuple[PublishedTokenizer, str]:
    """(the tokenizer, its split pattern: "" for tokenizer.json) from the files in `directory`."""
    config = {**_json_object(directory / "special_tokens_map.json"), **_json_object(directory / TOKENIZER_CONFIG)}
    if (directory / HF_TOKENIZER_JSON).is_file():
        backend, pattern = _TokenizersBackend(directory / HF_TOKENIZER_JSON), ""
    else:
        pattern = _tiktoken_pattern(directory, config)
        backend = _TiktokenBackend(name, _ranks(directory / TIKTOKEN_MODEL), pattern, _added_tokens(directory, config))
    return PublishedTokenizer(name, backend, config, template_text(directory, config)), pattern


def _ranks(path: Path) -> dict[bytes, int]:
    return parse_tiktoken_file(path.read_bytes(), str(path))


def _added_tokens(directory: Path, config: dict) -> dict[str, int]:
    """tokenizer_config.json's added_tokens_decoder: {"id": {"content": ...}} -> {content: id}."""
    added = config.get("added_tokens_decoder") or {}
    try:
        return {str(entry["content"] if isinstance(entry, dict) else entry): int(token_id)
                for token_id, entry in added.items()}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{directory / TOKENIZER_CONFIG}: added_tokens_decoder: expected {{\"id\": {{\"content\": "
                        "TOKEN, ...}}}}") from None


def _tiktoken_pattern(directory: Path, config: dict) -> str:
    """The split pattern of a tiktoken.model (see the module docstring for where it comes from)."""
    module = _tokenizer_module(config)
    if module is not None and (directory / module).is_file():
        found = pattern_in_source((directory / module).read_text(encoding="utf-8"), str(directory / module))
        if found is not None:
            return found
    return str(config.get("pat_str") or TRANSFORMERS_TIKTOKEN_PATTERN)


def pattern_in_source(source: str, where: str) -> str | None:
    """The value of the first `pat_str = ...` assignment in Python source (module or class level): a string, or
    `"|".join([strings])` as Kimi's tokenizer writes it. Read from the syntax tree; nothing is run."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise DataError(f"{where}: not Python ({first_line(e)})") from None
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        if any(isinstance(t, ast.Name) and t.id == "pat_str" for t in targets):
            return _string_value(node.value, where)
    return None


def _string_value(node: ast.expr, where: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join" \
            and isinstance(node.func.value, ast.Constant) and len(node.args) == 1:
        try:
            parts = ast.literal_eval(node.args[0])
        except ValueError:
            parts = None
        if isinstance(parts, (list, tuple)) and all(isinstance(p, str) for p in parts):
            return str(node.func.value.value).join(parts)
    raise DataError(f"{where}: pat_str is not a string literal or a join of literals; cannot read the split pattern")


def _tokenizer_module(config: dict) -> str | None:
    """The file of the tokenizer class `auto_map` names ("tokenization_kimi.TikTokenTokenizer" -> its .py)."""
    auto_map = config.get("auto_map")
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if isinstance(entry, (list, tuple)):
        entry = next((e for e in entry if e), None)
    if not isinstance(entry, str) or "." not in entry:
        return None
    return entry.split("--")[-1].rsplit(".", 1)[0] + ".py"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({first_line(e)}); expected a JSON object") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected an object")
    return data
