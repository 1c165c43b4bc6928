"""data_prep --format chat: round trips of conversations and loss masks, the row layouts, bad rows, --strict,
--tokenizer-from, builtin-chat, verification and rebuilding of mask shards.

Shards are read here with numpy and checked with hashlib, independently of gpt_moe.data; what each
conversation should become is written out by hand from the template (`<|user|>text<|end|>...`) as well as
taken from `gpt_moe.data.chat_template.render_conversation`, the one definition data_prep must follow.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from data_prep import PrepareConfig, prepare
from data_prep.builtin_chat import EVAL_KINDS, IN_CONTEXT_KINDS, conversations, heldout_eval_items, library_definitions
from data_prep.shards import is_val, part_number
from gpt_moe.data.chat_template import render_conversation
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.tokenizer import TokenizerInfo, load_saved_tokenizer, mergeable_ranks, save_tokenizer
from gpt_moe.data.verify import verify_data
from gpt_moe.errors import DataError
from tests.conftest import make_tiny_export
from tests.test_data_prep import EPOCH, assert_one_line_error, dir_bytes, run_cli


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


# ------------------------------------------------------------------------------------------ helpers


def chat_rows(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Varied conversations: system prompts, several turns, Unicode, text that spells a marker, an empty reply."""
    rng = random.Random(seed)
    words = ["naïve", "東京", "😀", "Привет", "def f(x):", "<|user|>", "<|end|>", "<|endoftext|>", "\n", "  ", "½",
             "the", "data", "model", "e\u0301"]
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": " ".join(rng.choices(words, k=4))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))})
            reply = "" if rng.random() < 0.05 else " ".join(rng.choices(words, k=rng.randint(1, 20)))
            messages.append({"role": "assistant", "content": reply})
        conversations.append(messages)
    return conversations


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def decoded_conversations(out: Path) -> dict[str, list[tuple[list[int], list[int], str]]]:
    """Per split, every conversation as (ids without the end-of-text, mask, shard file), read with numpy; checks
    hashes, sizes, the end-of-text after each conversation (mask 0) and that no shard ends inside one."""
    manifest = json.loads((out / "manifest.json").read_text())
    eot = manifest["tokenizer"]["eot_id"]
    dtype = np.dtype("<u2" if manifest["dtype"] == "uint16" else "<u4")
    found = {}
    for name, split in manifest["splits"].items():
        found[name] = []
        for shard in split["shards"]:
            data, mask_data = (out / shard["file"]).read_bytes(), (out / shard["mask_file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert hashlib.sha256(mask_data).hexdigest() == shard["mask_sha256"]
            tokens, mask = np.frombuffer(data, dtype), np.frombuffer(mask_data, np.uint8)
            assert len(tokens) == len(mask) == shard["tokens"] and set(mask.tolist()) <= {0, 1}
            assert tokens[-1] == eot, f"{shard['file']} ends inside a conversation"
            ends = np.flatnonzero(tokens == eot)
            assert not mask[ends].any()
            for start, end in zip([0, *(ends[:-1] + 1).tolist()], ends.tolist()):
                found[name].append((tokens[start:end].tolist(), mask[start:end].tolist(), shard["file"]))
    return found


def template_text(messages: list[dict[str, str]]) -> str:
    """The conversation written out by hand from the template."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


@pytest.fixture(scope="module")
def base_data(tmp_path_factory) -> Path:
    """A prepared text directory whose tokenizer (bpe:400) the chat data borrows."""
    root = tmp_path_factory.mktemp("base")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(template_text(m) for m in chat_rows(200, seed=9)), encoding="utf-8")
    prepare(PrepareConfig(sources=(str(corpus),), tokenizer="bpe:400", out=root / "data", val_fraction=0,
                          progress_bar=False))
    return root / "data"


def base_tokenizer(base: Path) -> tiktoken.Encoding:
    return load_saved_tokenizer(TokenizerInfo.from_dict(json.loads((base / "manifest.json").read_text())["tokenizer"]),
                                base)


CHAT_ARGS = ["--format", "chat", "--workers", "1"]


# -------------------------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def prepared_chat(tmp_path_factory, base_data) -> tuple[Path, list[list[dict[str, str]]], list[str]]:
    """60 conversations through the CLI, in parts of about 400 tokens; the output and the rows; the arguments."""
    root = tmp_path_factory.mktemp("chat")
    rows = chat_rows(60, seed=1)
    source = write_jsonl(root / "rows.jsonl", [{"messages": m, "id": i} for i, m in enumerate(rows)])
    args = [*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data), "--shard-tokens", "400",
            "--val-fraction", "0.2", "--out", str(root / "out")]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return root / "out", rows, args


def test_chat_round_trip_tokens_and_masks(prepared_chat, base_data):
    out, rows, _ = prepared_chat
    enc = base_tokenizer(base_data)
    decoded = decoded_conversations(out)
    train, val = decoded["train"], decoded["val"]
    held_out = [is_val(index, 0.2) for index in range(len(rows))]  # every 5th conversation, and the second
    assert len(train) + len(val) == len(rows) and len(val) == sum(held_out)
    assert len({file for *_, file in train}) > 3  # several parts: conversations were never cut between them
    in_order = iter(train), iter(val)
    for messages, val_conversation in zip(rows, held_out):
        ids, mask, _ = next(in_order[val_conversation])
        assert (ids, mask) == tuple(map(list, render_conversation(enc, messages)))
        assert enc.decode(ids) == template_text(messages)  # markers are special tokens, typed markers stay text
        trained = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
        assert enc.decode([t for t, m in zip(ids, mask) if m]) == trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["content"] == "chat" and manifest["chat"]["max_seq_len"] == 2048
    for name, found in decoded.items():
        assert manifest["chat"]["splits"][name] == {"conversations": len(found),
                                                    "tokens": sum(len(ids) + 1 for ids, _, _ in found),
                                                    "trained_tokens": sum(sum(mask) for _, mask, _ in found)}
    from gpt_moe.data.chat_template import JINJA_TEMPLATE
    assert manifest["chat"]["template_sha256"] == hashlib.sha256(JINJA_TEMPLATE.encode()).hexdigest()


def test_reader_gives_masks_aligned_with_tokens(prepared_chat, tmp_path):
    out, _, _ = prepared_chat
    shards = TokenShards(out)
    assert shards.content == "chat"
    for split in ("train", "val"):
        tokens, masks = shards.tokens(split), shards.masks(split)
        assert [len(t) for t in tokens] == [len(m) for m in masks] and all(m.dtype == np.uint8 for m in masks)
        assert all(not m.flags.writeable for m in masks)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    mask_file = json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][0]["mask_file"]
    (copy / mask_file).write_bytes((copy / mask_file).read_bytes()[:-1])
    with pytest.raises(DataError, match=rf"{mask_file}: \d+ bytes, the manifest says \d+ tokens .* uint8 loss mask"):
        TokenShards(copy)


def test_text_data_has_no_masks(base_data):
    shards = TokenShards(base_data)
    assert shards.content == "text" and "mask_file" not in (base_data / "manifest.json").read_text()
    with pytest.raises(DataError, match="text data has no loss masks"):
        shards.masks("train")


def test_output_does_not_depend_on_workers(base_data, tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"messages": m} for m in chat_rows(80, seed=4)]
                         + ["not json", {"messages": []}])
    for workers in (1, 2):
        prepare(PrepareConfig(sources=(str(source),), format="chat", tokenizer_from=str(base_data), workers=workers,
                              shard_tokens=500, out=tmp_path / f"w{workers}", progress_bar=False))
    assert dir_bytes(tmp_path / "w1") == dir_bytes(tmp_path / "w2")


# ------------------------------------------------------------------------------------------- row layouts


def test_prompt_completion_rows(base_data, tmp_path):
    pairs = [("What is 2+2?", "4"), ("Say hi in Japanese.", "こんにちは"), ("Name a prime.", "7")]
    source = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c, "extra": 1} for p, c in pairs])
    out = tmp_path / "out"
    result = run_cli(*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    enc = base_tokenizer(base_data)
    decoded = decoded_conversations(out)
    found = [decoded["train"][0], decoded["val"][0], decoded["train"][1]]  # the second conversation validates
    for (prompt, completion), (ids, mask, _) in zip(pairs, found):
        assert enc.decode(ids) == f"<|user|>{prompt}<|end|><|assistant|>{completion}<|end|>"
        assert enc.decode([t for t, m in zip(ids, mask) if m]) == completion + "<|end|>"


def test_messages_field_in_parquet(base_data, tmp_path):
    rows = chat_rows(5, seed=2)
    source = tmp_path / "rows.parquet"
    conversation = [json.dumps(m) for m in rows] + ["[]"]  # the last row has an empty conversation
    pq.write_table(pa.table({"conversation": [json.loads(c) for c in conversation], "messages": ["x"] * 6}), source)
    out = tmp_path / "out"
    result = run_cli(*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data),
                     "--messages-field", "conversation", "--out", str(out))
    assert result.returncode == 0, result.stderr
    enc = base_tokenizer(base_data)
    decoded = decoded_conversations(out)
    texts = sorted(enc.decode(ids) for split in decoded.values() for ids, _, _ in split)
    assert texts == sorted(template_text(m) for m in rows)
    assert f"1 no messages ({source} row 5: field 'conversation' is empty" in result.stderr, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["messages_field"] == "conversation" and manifest["chat"]["skipped"]["no_messages"] == 1


# -------------------------------------------------------------------------------------------- bad rows

GOOD = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
LONG = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "data " * 200}]}
BAD_ROWS = {  # kind: (two bad rows, how the report names the kind, the problem of the first)
    "not_json": (['{"messages": [', "plain text"], "not JSON", r"not valid JSON \(Expecting value at column \d+\)"),
    "no_messages": ([{"text": "a document"}, {"messages": "a string"}], "no messages",
                    r"field 'messages' is missing, expected a list of messages \(keys: text\)"),
    "unknown_role": ([{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
                      {"messages": [{"role": "bot", "content": "y"}]}], "unknown role",
                     r"message 1 has role 'tool', expected one of system, user, assistant"),
    "non_string_content": ([{"messages": [{"role": "user", "content": ["a", "b"]}, GOOD["messages"][1]]},
                            {"prompt": "p", "completion": None}], "non-string content",
                           r"message 1 \(user\) content is a JSON array, expected a string"),
    "no_assistant_turn": ([{"messages": [{"role": "user", "content": "anyone?"}]},
                           {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}],
                          "no assistant turn", r"no assistant message among 1 \(roles: user\)"),
    "too_long": ([LONG, LONG], "too long", r"\d+ tokens with the end-of-text token, more than --max-seq-len 64"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows_are_skipped_counted_and_reported(base_data, tmp_path, kind):
    bad, label, problem = BAD_ROWS[kind]
    source = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, bad[0], GOOD, bad[1], GOOD])  # bad at lines 3, 5
    out = tmp_path / "out"
    result = run_cli(*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data), "--max-seq-len", "64",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chat"]["skipped"] == {k: 2 if k == kind else 0 for k in BAD_ROWS}
    assert [w.split(": ")[0] for w in manifest["chat"]["skipped_first"][kind]] == [f"{source}:3", f"{source}:5"]
    assert sum(s["conversations"] for s in manifest["chat"]["splits"].values()) == 4
    reports = [line for line in result.stderr.splitlines() if "bad row" in line]
    assert len(reports) == 1, result.stderr  # reported once, at the end
    where = re.escape(str(source))
    assert re.search(rf"skipped 2 bad row\(s\): 2 {label} \({where}:3: {problem}; {where}:5: ", reports[0]), reports
    assert "2 bad rows skipped" in result.stdout


def test_strict_makes_the_first_bad_row_an_error(base_data, tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, GOOD, {"messages": [{"role": "user", "content": "?"}]},
                                                   "not json"])
    out = tmp_path / "out"
    result = run_cli(*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data), "--strict",
                     "--out", str(out))
    assert_one_line_error(result, rf"{source}:4: no assistant message among 1 \(roles: user\) \(bad row: no "
                                  r"assistant turn\); --strict stops at the first bad row; hint:")
    assert not (out / "manifest.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    early = write_jsonl(tmp_path / "early.jsonl", ["{oops", GOOD, GOOD])  # refused before anything is written
    result = run_cli(*CHAT_ARGS, "--source", str(early), "--tokenizer-from", str(base_data), "--strict",
                     "--out", str(tmp_path / "early"))
    assert_one_line_error(result, rf"{early}:1: not valid JSON .*\(bad row: not JSON\)")
    assert not (tmp_path / "early").exists()


def test_rows_without_conversations_are_refused_up_front(base_data, tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"document {i}"} for i in range(5)])
    result = run_cli(*CHAT_ARGS, "--source", str(source), "--tokenizer-from", str(base_data),
                     "--out", str(tmp_path / "out"))
    assert_one_line_error(result, rf"no conversation in the first 5 row\(s\): 5 no messages \({source}:1: .*"
                                  r"--messages-field NAME")
    assert not (tmp_path / "out").exists() and result.seconds < 15


# ------------------------------------------------------------------------------------- --tokenizer-from


def checkpoint_like(root: Path, enc: tiktoken.Encoding) -> Path:
    """A run directory as the trainer leaves it, as far as a tokenizer goes: a complete checkpoint tag holding
    tokenizer_info.json and the tokenizer file."""
    tag = root / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    info = save_tokenizer(enc, tag)
    (tag / "tokenizer_info.json").write_text(json.dumps(info.to_dict()))
    (tag / "COMPLETE").write_text("{}")
    return root


@pytest.mark.parametrize("kind", ["data", "checkpoint", "export"])
def test_tokenizer_from_copies_the_tokenizer(base_data, tmp_path, kind):
    if kind == "data":
        source = base_data
    elif kind == "checkpoint":
        source = checkpoint_like(tmp_path / "run", base_tokenizer(base_data))
    else:
        source = make_tiny_export(tmp_path / "export")
    record = {"data": lambda: json.loads((source / "manifest.json").read_text())["tokenizer"],
              "checkpoint": lambda: json.loads((source / "checkpoints/step_00000010/tokenizer_info.json").read_text()),
              "export": lambda: json.loads((source / "gpt_moe.json").read_text())["tokenizer"]}[kind]()
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"messages": m} for m in chat_rows(6, seed=5)])
    out = tmp_path / "out"
    result = run_cli(*CHAT_ARGS, "--source", str(rows), "--tokenizer-from", str(source), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == record["sha256"] and manifest["tokenizer"]["name"] == record["name"]
    assert hashlib.sha256((out / "tokenizer.tiktoken").read_bytes()).hexdigest() == record["sha256"]
    assert manifest["args"]["tokenizer_from"] == str(source) and manifest["args"]["tokenizer"] is None
    other = base_data if kind == "export" else make_tiny_export(tmp_path / "other")  # another tokenizer
    mixed = run_cli(*CHAT_ARGS, "--source", str(rows), "--tokenizer-from", str(other), "--out", str(out))
    assert_one_line_error(mixed, rf"{out} already holds data tokenized with .* refusing to mix in the tokenizer of "
                                 r"--tokenizer-from")


def test_tokenizer_without_chat_markers_is_refused_in_one_line(base_data, tmp_path):
    plain = tiktoken.Encoding("plain", pat_str=base_tokenizer(base_data)._pat_str,
                              mergeable_ranks=mergeable_ranks(base_tokenizer(base_data)),
                              special_tokens={"<|endoftext|>": 399})
    run = checkpoint_like(tmp_path / "run", plain)
    rows = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD])
    result = run_cli(*CHAT_ARGS, "--source", str(rows), "--tokenizer-from", str(run), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, rf"--tokenizer-from {run}: tokenizer 'plain' has no special token <\|system\|>")
    assert not (tmp_path / "out").exists() and result.seconds < 15
    for args, expected in ((["--tokenizer", "bpe:300"], "a new BPE cannot be what a base model was trained with"),
                           ([], "chat data must use the tokenizer of the model it fine-tunes"),
                           (["--tokenizer-from", str(tmp_path)], "no tokenizer record here")):
        result = run_cli(*CHAT_ARGS, "--source", str(rows), *args, "--out", str(tmp_path / "out"))
        assert_one_line_error(result, expected)


# ------------------------------------------------------------------------------------------ builtin-chat


def test_builtin_chat_is_deterministic_and_holds_out_whole_modules():
    first = list(conversations())
    library_definitions.cache_clear()
    assert list(conversations()) == first  # parsed again from the files: the same conversations
    train = {c.module for c in first if c.split == "train"}
    val = {c.module for c in first if c.split == "val"}
    assert val and not train & val
    assert 5000 <= len(first) <= 20000 and len(val) >= 20
    kinds = {kind for c in first for kind in c.kinds}
    assert kinds == {"doc", "signature", "module", *IN_CONTEXT_KINDS}
    assert sum(c.in_context for c in first) > len(first) / 3
    assert any(c.messages[0]["role"] == "system" for c in first) and any(len(c.kinds) > 1 for c in first)
    for c in first:  # every turn alternates user / assistant after an optional system prompt
        roles = [m["role"] for m in c.messages if m["role"] != "system"]
        assert roles == ["user", "assistant"] * len(c.kinds) and all(m["content"] for m in c.messages)


def test_heldout_eval_items_ask_about_pasted_code():
    items = list(heldout_eval_items())
    val = [c for c in conversations("val")]
    assert {item.kind for item in items} == set(EVAL_KINDS) and len(items) >= 100
    expected = sum(kind in EVAL_KINDS for c in val for kind in c.kinds)
    assert len(items) == expected
    for item in items:
        assert item.messages[-1]["role"] == "user" and item.answer
        code = next(m["content"] for m in item.messages if "```python" in m["content"])
        def_line = code.split("```python\n", 1)[1].split("\n", 1)[0]
        assert def_line.startswith(("def ", "async def ")) and def_line.endswith(":")
        if item.kind == "name":
            assert f"def {item.answer}(" in def_line
        else:
            assert f"({item.answer})" in def_line
    assert len(list(heldout_eval_items(["raises"], limit=5))) == 5
    with pytest.raises(ValueError, match="unknown question kinds"):
        list(heldout_eval_items(["colour"]))


def test_builtin_chat_through_data_prep_keeps_the_source_split(tmp_path, tiny_checkpoint):
    out = tmp_path / "chat"
    result = run_cli("--format", "chat", "--source", "builtin-chat", "--tokenizer-from", str(tiny_checkpoint),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    enc = load_saved_tokenizer(TokenizerInfo.from_dict(json.loads((out / "manifest.json").read_text())["tokenizer"]),
                               out)
    decoded = decoded_conversations(out)
    for split in ("train", "val"):
        expected = [c for c in conversations() if c.split == split]
        assert [ids for ids, _, _ in decoded[split]] == [render_conversation(enc, c.messages)[0] for c in expected]


# ------------------------------------------------------------------------------- verification, rebuilding


def test_verify_data_catches_an_altered_mask_shard(prepared_chat, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(prepared_chat[0], out)
    verify_data(TokenShards(out), "always")
    mask_file = json.loads((out / "manifest.json").read_text())["splits"]["val"]["shards"][0]["mask_file"]
    data = bytearray((out / mask_file).read_bytes())
    data[3] ^= 1  # same size: only the sha256 tells
    (out / mask_file).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{mask_file}: sha256 .* differs from the manifest's .* \(altered shard\); "
                                        r"hint: rerun `python -m data_prep --format chat"):
        verify_data(TokenShards(out), "first")


def test_rerun_rebuilds_a_damaged_mask_shard(prepared_chat, tmp_path):
    original, _, args = prepared_chat
    out = tmp_path / "data"
    shutil.copytree(original, out)
    args = [*args[:-1], str(out)]
    before = dir_bytes(out)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 4
    altered, missing = shards[2]["mask_file"], shards[4]["mask_file"]
    data = bytearray((out / altered).read_bytes())
    data[0] ^= 1
    (out / altered).write_bytes(bytes(data))
    (out / missing).unlink()
    untouched = {s["file"]: (out / s["file"]).stat().st_mtime_ns for s in shards}
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"rebuilt 2 damaged or missing file(s): {altered} (sha256 " in result.stdout, result.stdout
    assert f"{missing} (missing)" in result.stdout
    assert f"re-encoding parts {part_number(altered)} to {part_number(missing)}" in result.stderr
    assert dir_bytes(out) == before
    assert {name: (out / name).stat().st_mtime_ns for name in untouched} == untouched  # token shards not rewritten
    again = run_cli(*args)
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_interrupted_chat_run_resumes_with_its_skipped_rows(base_data, tmp_path, monkeypatch):
    rows = [{"messages": m} for m in chat_rows(50, seed=7)]
    rows[10:10] = ["broken", {"messages": [{"role": "user", "content": "alone"}]}]
    rows += ["trailing junk"]  # a bad row after the last conversation is counted too
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = dict(sources=(str(source),), format="chat", tokenizer_from=str(base_data), shard_tokens=300,
                  progress_bar=False)
    prepare(PrepareConfig(out=tmp_path / "reference", **config))
    import data_prep.pipeline as pipeline

    closed = 0
    close_part = pipeline._PartWriter.close_part

    def failing_close_part(self):
        nonlocal closed
        closed += 1
        if closed == 3:
            raise KeyboardInterrupt
        close_part(self)

    monkeypatch.setattr(pipeline._PartWriter, "close_part", failing_close_part)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(out=tmp_path / "resumed", **config))
    monkeypatch.setattr(pipeline._PartWriter, "close_part", close_part)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    prepare(PrepareConfig(out=tmp_path / "resumed", **config))
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "reference")
    skipped = json.loads((tmp_path / "reference" / "manifest.json").read_text())["chat"]["skipped"]
    assert skipped["not_json"] == 2 and skipped["no_assistant_turn"] == 1


def test_bad_rows_after_the_last_full_part_are_counted(base_data, tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", [GOOD, GOOD, GOOD, "junk", {"messages": []}])
    out = tmp_path / "out"
    prepare(PrepareConfig(sources=(str(source),), format="chat", tokenizer_from=str(base_data), shard_tokens=1,
                          out=out, progress_bar=False))  # every conversation fills a part: the bad rows come after
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) + len(manifest["splits"]["val"]["shards"]) == 3
    assert manifest["chat"]["skipped"]["not_json"] == 1 and manifest["chat"]["skipped"]["no_messages"] == 1


def test_chat_and_text_data_never_share_a_directory(base_data, tmp_path):
    """Text data prepared into --out, then chat data asked for there (and the other way round): one line naming the
    two formats, the directory as it was."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 50, encoding="utf-8")
    text_out, chat_out = tmp_path / "text", tmp_path / "chat"
    assert run_cli("--source", str(corpus), "--tokenizer", "bpe:300", "--val-fraction", "0", "--out",
                   str(text_out)).returncode == 0
    rows = write_jsonl(tmp_path / "rows.jsonl", [GOOD] * 4)
    assert run_cli(*CHAT_ARGS, "--source", str(rows), "--tokenizer-from", str(base_data), "--val-fraction", "0",
                   "--out", str(chat_out)).returncode == 0
    before = {p.name: p.read_bytes() for p in text_out.iterdir() if p.is_file()}
    mixed = run_cli(*CHAT_ARGS, "--source", str(rows), "--tokenizer-from", str(base_data), "--val-fraction", "0",
                    "--out", str(text_out))
    assert_one_line_error(mixed, f"{text_out} already holds a prepared dataset of text data; refusing to add chat data")
    assert {p.name: p.read_bytes() for p in text_out.iterdir() if p.is_file()} == before
    other = run_cli("--source", str(corpus), "--tokenizer", "bpe:300", "--val-fraction", "0", "--out", str(chat_out))
    assert_one_line_error(other, f"{chat_out} already holds a prepared dataset of chat data; refusing to add text data")
