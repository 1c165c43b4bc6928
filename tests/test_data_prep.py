"""data_prep: round trips against the input files, worker-count independence, resume after SIGKILL, CLI errors.

Decoding here is independent of gpt_moe.data: shards are read with numpy, checked against the
manifest with hashlib, split at the end-of-text id and decoded with the saved tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import regex

from data_prep import PrepareConfig, prepare
from data_prep.encode import _SAFE_CUT, split_text
from data_prep.shards import is_val, part_number
from gpt_moe.data.shards import TokenShards
from gpt_moe.data.tokenizer import BPE_PAT_STR, TokenizerInfo, load_saved_tokenizer, load_standard
from gpt_moe.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
EPOCH = "1700000000"


# ------------------------------------------------------------------------------------------ helpers


def decoded_documents(out: Path) -> dict[str, tuple[list[bytes], bool]]:
    """Per split: the documents' bytes in stream order, and whether the last one ended (EOT)."""
    manifest = json.loads((out / "manifest.json").read_text())
    info = TokenizerInfo.from_dict(manifest["tokenizer"])
    enc = load_saved_tokenizer(info, out)
    dtype = np.dtype("<u2" if manifest["dtype"] == "uint16" else "<u4")
    result = {}
    for name, split in manifest["splits"].items():
        arrays = []
        for shard in split["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            arrays.append(np.frombuffer(data, dtype=dtype))
            assert len(arrays[-1]) == shard["tokens"] and shard["max_token_id"] == arrays[-1].max()
        tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype)
        assert len(tokens) == split["tokens"]
        ends = np.flatnonzero(tokens == info.eot_id).tolist()
        docs, start = [], 0
        for end in ends:
            docs.append(enc.decode_bytes(tokens[start:end].tolist()))
            start = end + 1
        complete = start == len(tokens)
        if not complete:
            docs.append(enc.decode_bytes(tokens[start:].tolist()))
        assert split["documents"] == len(docs)
        result[name] = (docs, complete)
    return result


def assert_partition(reference: list[bytes], decoded: dict[str, tuple[list[bytes], bool]],
                     truncated: bool = False) -> None:
    """train and val are complementary in-order subsequences of the reference documents.

    With `truncated`, the stream stopped inside the last decoded document: it is a prefix.
    """
    train, val = list(decoded["train"][0]), list(decoded["val"][0])
    n = len(train) + len(val)
    assert n <= len(reference)
    if not truncated:
        assert n == len(reference)
        assert decoded["train"][1] and decoded["val"][1]
    for i, doc in enumerate(reference[:n]):
        last = i == n - 1
        for split in (train, val):
            if split and (split[0] == doc or (truncated and last and doc.startswith(split[0]))):
                split.pop(0)
                break
        else:
            raise AssertionError(f"document {i} not found at the head of train or val")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m data_prep ARGS with a fixed clock; `env` replaces the environment when given. The result's
    `seconds` is the wall time of the run."""
    env = {**(os.environ if env is None else env), "SOURCE_DATE_EPOCH": EPOCH}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "data_prep", *args, "--no-progress"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    result.seconds = time.monotonic() - start
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> str:
    """Exit code 2, no traceback, and the last line of stderr is the only `error: ...` line, matching
    the regular expression `expected`; returns that line."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    assert regex.search(expected, errors[0]), errors[0]
    return errors[0]


RUN_FILES = {".data_prep.lock", "verified.json"}  # they describe runs (holder, mtimes), not the dataset


def dir_bytes(path: Path) -> dict[str, bytes]:
    """The dataset's files, by name."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name not in RUN_FILES}


def prepare_quiet(**kwargs) -> None:
    prepare(PrepareConfig(progress_bar=False, **kwargs))


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)


def _texts(n: int, seed: int) -> list[str]:
    """Varied documents: stdlib source slices, prose with Unicode, CRLF, a literal special token."""
    rng = random.Random(seed)
    source = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    words = ["naïve", "café", "東京", "😀", "Привет", "e\u0301", "the", "data", "<|endoftext|>", "\r\n", "\t", "½"]
    docs = []
    for _ in range(n):
        start = rng.randrange(len(source) - 2000)
        docs.append(source[start:start + rng.randint(10, 1500)] + " ".join(rng.choices(words, k=rng.randint(0, 40))))
    return docs


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory) -> tuple[Path, dict[str, list[bytes]]]:
    """.txt, .jsonl and .parquet inputs and, per kind, the documents each should yield."""
    root = tmp_path_factory.mktemp("corpus")
    texts = _texts(60, seed=0)
    (root / "txt").mkdir()
    for i, text in enumerate(texts[:12]):
        (root / "txt" / f"doc{i:02d}.txt").write_bytes(text.encode())
    (root / "txt" / "doc99_empty.txt").write_bytes(b"")
    rows = [{"text": t, "id": i} for i, t in enumerate(texts[12:40])] + [{"text": "", "id": -1}]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": texts[40:], "n": list(range(len(texts) - 40))}), root / "rows.parquet")
    # the reference documents, read independently of data_prep (empty ones are dropped)
    txt = [p.read_bytes() for p in sorted((root / "txt").glob("*.txt"))]
    jsonl = [json.loads(line)["text"].encode() for line in (root / "rows.jsonl").read_text().splitlines()]
    parquet = [t.encode() for t in pq.read_table(root / "rows.parquet").column("text").to_pylist()]
    refs = {"txt": [d for d in txt if d], "jsonl": [d for d in jsonl if d], "parquet": [d for d in parquet if d]}
    return root, refs


def builtin_reference(n_files: int) -> list[bytes]:
    """The first documents of `builtin`, by its definition: sorted stdlib .py files read as Python does."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "pydoc_data", "__pycache__"}
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts))
    docs = []
    for name in names:
        try:
            with tokenize.open(root / name) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError):
            continue
        if text:
            docs.append(text.encode())
        if len(docs) == n_files:
            break
    return docs


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "mixed"])
def test_round_trip_local_files(local_corpus, tmp_path, kind):
    root, refs = local_corpus
    sources = {"txt": [str(root / "txt" / "*.txt")], "jsonl": [str(root / "rows.jsonl")],
               "parquet": [str(root / "rows.parquet")],
               "mixed": [str(root / "rows.parquet"), str(root / "txt"), str(root / "rows.jsonl")]}[kind]
    reference = refs["parquet"] + refs["txt"] + refs["jsonl"] if kind == "mixed" else refs[kind]
    out = tmp_path / "out"
    prepare_quiet(sources=tuple(sources), tokenizer="bpe:400", out=out, val_fraction=0.2, shard_tokens=3000)
    decoded = decoded_documents(out)
    assert_partition(reference, decoded)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 1 and decoded["val"][0]
    assert manifest["tokenizer"]["n_vocab"] == 400 and manifest["dtype"] == "uint16"
    assert manifest["created_at"] == "2023-11-14T22:13:20Z"
    assert not (out / "progress.json").exists()


def test_round_trip_builtin_with_token_cap(tmp_path):
    out = tmp_path / "out"
    prepare_quiet(sources=("builtin",), tokenizer="bpe:512", out=out, max_tokens=60_000, val_fraction=0.1,
                  shard_tokens=20_000, bpe_sample_chars=300_000)
    decoded = decoded_documents(out)
    total = sum(json.loads((out / "manifest.json").read_text())["splits"][s]["tokens"] for s in ("train", "val"))
    assert total == 60_000
    n_docs = len(decoded["train"][0]) + len(decoded["val"][0])
    assert_partition(builtin_reference(n_docs), decoded, truncated=True)


def test_output_does_not_depend_on_workers(tmp_path):
    for workers in (1, 2):
        prepare_quiet(sources=("builtin",), tokenizer="bpe:512", out=tmp_path / f"w{workers}", workers=workers,
                      max_tokens=400_000, val_fraction=0.05, shard_tokens=60_000, bpe_sample_chars=1_000_000)
    one, two = dir_bytes(tmp_path / "w1"), dir_bytes(tmp_path / "w2")
    assert sorted(one) == sorted(two) and len([n for n in one if n.startswith("train_")]) > 3
    assert one == two  # shards, tokenizer and manifest, byte for byte


# ------------------------------------------------------------------------------- safe document cuts


def _standard_patterns(monkeypatch) -> dict[str, str]:
    """The pre-tokenization patterns of tiktoken's standard encodings, without their BPE files."""
    import tiktoken_ext.openai_public as public

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *a, **k: {})
    monkeypatch.setattr(public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {})
    return {name: getattr(public, name)()["pat_str"] for name in ("gpt2", "cl100k_base", "o200k_base")}


def test_safe_cuts_do_not_change_pre_tokenization(monkeypatch):
    patterns = {"bpe": BPE_PAT_STR, **_standard_patterns(monkeypatch)}
    rng = random.Random(0)
    alphabet = list("aZé東 \n\n\r\t.;'s9_") + ["  ", " \n", "\n ", "½", "\u2028", "\xa0"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(1500)] + _texts(20, seed=1)
    for name, pat in patterns.items():
        pattern = regex.compile(pat)
        for text in texts:
            whole = pattern.findall(text)
            for cut in (m.start() for m in _SAFE_CUT.finditer(text)):
                assert pattern.findall(text[:cut]) + pattern.findall(text[cut:]) == whole, (name, text, cut)


def test_long_documents_are_cut_without_changing_tokens():
    enc = load_standard("cl100k_base")
    text = "\n".join(_texts(30, seed=2))
    pieces = list(split_text([text[i:i + 777] for i in range(0, len(text), 777)], max_chars=1000))
    assert "".join(pieces) == text and all(0 < len(p) <= 1000 for p in pieces) and len(pieces) > 10
    cuts = np.cumsum([len(p) for p in pieces])[:-1]
    safe = {m.start() for m in _SAFE_CUT.finditer(text)}
    assert set(cuts.tolist()) <= safe  # real text always offers a safe point
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


# ---------------------------------------------------------------------------- interruption, resume


# the CLI with a pause after each batch of pieces (0.2 s, or $SLOW_BATCH_SECONDS), so that a kill lands mid-way
SLOW_CLI = """
import os, sys, time
import data_prep.pipeline as pipeline
fast = pipeline.batches
def slow(*args, **kwargs):
    for batch in fast(*args, **kwargs):
        yield batch
        time.sleep(float(os.environ.get("SLOW_BATCH_SECONDS", "0.2")))
pipeline.batches = slow
from data_prep.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_way_then_rerun_resumes_to_identical_output(tmp_path):
    args = ["--source", "builtin", "--tokenizer", "cl100k_base", "--max-tokens", "1200k", "--shard-tokens", "60k",
            "--val-fraction", "0.02"]
    out = tmp_path / "killed"
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, "--out", str(out), "--workers", "2",
                                 "--no-progress"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "progress.json").read_text())["parts"]) >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-way
        proc.wait()
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists(), log.read_text()
    with pytest.raises(DataError, match="incomplete"):
        TokenShards(out)
    done = json.loads((out / "progress.json").read_text())["parts"]
    assert len(done) >= 3
    second = out / done[1]["shards"][0]["file"]
    data = bytearray(second.read_bytes())
    data[10] ^= 1  # a completed shard that no longer matches its record is prepared again
    second.write_bytes(bytes(data))

    resumed = run_cli(*args, "--out", str(out), "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "keeping 1 completed part(s)" in resumed.stderr
    reference = tmp_path / "reference"
    assert run_cli(*args, "--out", str(reference), "--workers", "1").returncode == 0
    assert dir_bytes(out) == dir_bytes(reference)

    again = run_cli(*args, "--out", str(out))
    assert again.returncode == 0 and "already prepared" in again.stdout
    assert dir_bytes(out) == dir_bytes(reference)

    mixed = run_cli(*args[:2], "--tokenizer", "bpe:512", *args[4:], "--out", str(out))
    assert mixed.returncode == 2 and "refusing to mix" in mixed.stderr
    other = run_cli(*[a.replace("1200k", "1M") for a in args], "--out", str(out))
    assert other.returncode == 2 and "other arguments (max_tokens" in other.stderr


# ------------------------------------------------------------------------------------- CLI errors


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "nofield.jsonl").write_text('{"body": "some text"}\n')
    (root / "nullrow.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (root / "empty.txt").write_text("")
    (root / "notes.md").write_text("# not a supported type\n")
    (root / "good.txt").write_text("some text")
    (root / "afile").write_text("")
    return root


@pytest.mark.parametrize("args, env, expected", [
    (["--source", "{root}/missing/*.txt"], {}, "unknown source"),
    (["--source", "{root}/notes.md"], {}, "unsupported type '.md'"),
    (["--source", "hf:roneneldan/TinyStories"], {"HF_ENDPOINT": "https://hub.invalid"},
     "cannot reach the Hugging Face Hub.*local files"),
    (["--source", "hf:roneneldan/TinyStories"], {"HF_HUB_OFFLINE": "1"},
     "cannot reach the Hugging Face Hub.*local files"),
    (["--source", "{root}/nofield.jsonl"], {}, "no text field 'text'; columns are body.*--text-field"),
    (["--source", "{root}/nullrow.jsonl"], {}, "row 1: text field 'text' is missing"),
    (["--source", "{root}/empty.txt"], {}, "empty corpus"),
    (["--source", "{root}/empty.txt", "--tokenizer", "sentencepiece"], {}, "unknown tokenizer 'sentencepiece'"),
    (["--source", "{root}/good.txt", "--val-fraction", "0", "--out", "{root}/afile/sub"], {}, "cannot write there"),
    (["--val-fraction", "1.5"], {}, r"--val-fraction 1.5: expected a number in \[0, 1\)"),
    (["--source", "{root}/good.txt", "--tokenizer", "bpe:4294967296"], {}, "bpe:4294967296.*N <= 16777216"),
])
def test_cli_bad_input_is_one_clear_line(bad_inputs, tmp_path, args, env, expected):
    args = [a.format(root=bad_inputs) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    env = {**{k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}, **env}
    result = run_cli(*args, "--text-field", "text", env=env)
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-tokens", "infk", "not finite"), ("--max-tokens", "nan", "not a count"),
    ("--shard-tokens", "1e30k", "too large"), ("--bpe-sample-chars", "2.5k5", "not a count"),
    ("--max-tokens", "1.2345k", "not a whole number"),
])
def test_absurd_counts_are_one_line_errors(tmp_path, flag, value, expected):
    result = run_cli(flag, value, "--out", str(tmp_path / "out"))
    line = assert_one_line_error(result, expected)
    assert f"argument {flag}: {value!r}" in line and result.seconds < 5
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad_line, expected", [
    (b'{"text": broken}', "not valid JSON"), (b'{"text": "cut', "not valid JSON"),
    (b'["text", "a list"]', "a JSON array, expected an object"), (b'{"text": "caf\xe9"}', "not UTF-8"),
])
def test_malformed_jsonl_line_is_named(tmp_path, bad_line, expected):
    lines = [b'{"text": "first document"}', b'{"text": "second"}', bad_line, b'{"text": "fourth"}']
    source = tmp_path / "rows.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli("--source", str(source), "--out", str(tmp_path / "out"), "--tokenizer", "bpe:300")
    line = assert_one_line_error(result, rf"{source}:3: {expected}.*hint: fix or remove line 3")
    assert result.seconds < 5, line


def test_ctrl_c_during_bpe_training_stops_at_once(tmp_path):
    """The BPE trainer does not look at signals while it runs (~12 s for bpe:4096 on the builtin sample here):
    Ctrl-C (SIGINT to the process group, as a terminal sends it) must end the run at once, trainer included."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    command = [sys.executable, "-m", "data_prep", "--tokenizer", "bpe:4096", "--out", str(tmp_path / "out"),
               "--no-progress"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while "training bpe:4096" not in seen and proc.poll() is None:
            seen += proc.stderr.readline()
        time.sleep(1.5)  # well inside the training
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and seconds < 3, (seconds, seen + rest)
    assert rest.strip().endswith("interrupted; run the same command again to resume into " + str(tmp_path / "out"))
    assert "Traceback" not in rest, rest
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # nothing of the run is left, the trainer included
        os.killpg(proc.pid, 0)


def test_bpe_larger_than_the_corpus_supports_is_named_by_its_real_size(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("a small corpus: only a few hundred merges are possible. " * 50)
    out = tmp_path / "out"
    result = run_cli("--source", str(corpus), "--tokenizer", "bpe:100000", "--out", str(out), "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    tokenizer = json.loads((out / "manifest.json").read_text())["tokenizer"]
    assert tokenizer["n_vocab"] < 1000 and tokenizer["name"] == f"bpe:{tokenizer['n_vocab']}"
    assert f"bpe:100000: the corpus sample gave {tokenizer['n_vocab']} tokens" in result.stderr
    assert f"tokenizer bpe:{tokenizer['n_vocab']}" in result.stdout


# ------------------------------------------------------------------------------- validation split


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.5, 0.7, 0.99])
def test_any_two_documents_hold_a_validation_and_a_training_document(fraction):
    for n in range(2, 300):
        held_out = sum(is_val(doc, fraction) for doc in range(n))
        assert 1 <= held_out < n, (fraction, n)
        assert held_out - int(n * fraction) in (0, 1)  # the fraction, evenly spread, plus at most document 1
    assert not any(is_val(doc, 0.0) for doc in range(300))


def test_small_corpus_gets_a_validation_split_and_val_fraction_0_none(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):  # 20 documents: 1% of them rounds down to none
        (corpus / f"{i:02d}.txt").write_text(f"document {i} says hello to the world. " * 20)
    result = run_cli("--source", str(corpus), "--tokenizer", "bpe:300", "--out", str(tmp_path / "default"))
    assert result.returncode == 0, result.stderr
    shards = TokenShards(tmp_path / "default")
    assert shards.has_split("val") and shards.has_split("train") and shards.manifest.splits["val"].documents >= 1
    result = run_cli("--source", str(corpus), "--tokenizer", "bpe:300", "--out", str(tmp_path / "none"),
                     "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    shards = TokenShards(tmp_path / "none")
    assert not shards.has_split("val") and shards.has_split("train")


def test_corpus_too_small_for_a_validation_document_is_refused(tmp_path):
    single = tmp_path / "one.txt"
    single.write_text("a single document " * 100)
    result = run_cli("--source", str(single), "--tokenizer", "bpe:300", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, r"one\.txt.*1 document, too few for a validation split \(--val-fraction 0\.01\)"
                                  ".*--val-fraction 0")
    assert result.seconds < 5 and not (tmp_path / "out").exists()

    two = tmp_path / "two"
    two.mkdir()
    (two / "a.txt").write_text("the first document is long enough " * 100)
    (two / "b.txt").write_text("the second one")
    capped = run_cli("--source", str(two), "--tokenizer", "bpe:300", "--out", str(tmp_path / "capped"),
                     "--max-tokens", "50")
    assert_one_line_error(capped, r"--max-tokens 50 ends inside the first document.*no validation document")
    assert not (tmp_path / "capped" / "manifest.json").exists()


# ------------------------------------------------------------------------------ the output directory


def test_unrelated_directory_is_never_written(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    files = {"tokenizer.tiktoken": b"someone's tokenizer", "train_00007.bin": b"someone's shard", "notes.txt": b"x"}
    for name, data in files.items():
        (theirs / name).write_bytes(data)
    result = run_cli("--source", str(corpus), "--val-fraction", "0", "--tokenizer", "bpe:300", "--out", str(theirs))
    assert_one_line_error(result, rf"--out {theirs}: not empty \(notes.txt, tokenizer.tiktoken, train_00007.bin\) "
                                  r"and not made by data_prep.*hint: choose a new or empty directory")
    assert result.seconds < 5 and dir_bytes(theirs) == files

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("--source", str(corpus), "--val-fraction", "0", "--tokenizer", "bpe:300", "--out", str(empty))
    assert result.returncode == 0 and (empty / "manifest.json").is_file(), result.stderr


def test_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path):
    args = ["--source", "builtin", "--tokenizer", "cl100k_base", "--max-tokens", "1200k", "--shard-tokens", "60k",
            "--val-fraction", "0.02"]
    out = tmp_path / "out"
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "SLOW_BATCH_SECONDS": "1"}
    first = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, "--out", str(out), "--workers", "2",
                              "--no-progress"], cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "progress.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        same = run_cli(*args, "--out", str(out))
        holder = rf"--out {out} is in use by another data_prep run \(pid {first.pid} on .*: .*-c .*--out {out}"
        assert_one_line_error(same, holder)
        other = run_cli(*[a.replace("1200k", "1M") for a in args], "--out", str(out))
        assert_one_line_error(other, holder)
        assert same.seconds < 5 and other.seconds < 5 and first.poll() is None
        os.kill(first.pid, signal.SIGKILL)  # the run alone: its tokenizer workers are left behind for a while
        first.wait()
        resumed = run_cli(*args, "--out", str(out))  # the lock went with the run that held it
        assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------- a finished directory, damaged

REBUILD_ARGS = ["--source", "builtin", "--tokenizer", "bpe:512", "--bpe-sample-chars", "300k", "--max-tokens", "400k",
                "--shard-tokens", "30k", "--val-fraction", "0.05"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "data"
    result = run_cli(*REBUILD_ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def _as_older_manifest(out: Path) -> None:
    """Rewrite the manifest as data_prep wrote it before it recorded part positions and largest token ids."""
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["parts"]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["max_token_id"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.mark.parametrize("older_manifest", [False, True])
def test_rerun_rebuilds_damaged_or_missing_files_and_nothing_else(finished, tmp_path, older_manifest):
    out = tmp_path / "data"
    shutil.copytree(finished, out)
    if older_manifest:
        _as_older_manifest(out)
    original = dir_bytes(out)
    manifest = json.loads((out / "manifest.json").read_text())
    train, val = ([s["file"] for s in manifest["splits"][name]["shards"]] for name in ("train", "val"))
    altered, missing = train[3], val[-1]
    data = bytearray((out / altered).read_bytes())
    data[11] ^= 0x01  # same size: only its sha256 tells
    (out / altered).write_bytes(bytes(data))
    (out / missing).unlink()
    (out / "tokenizer.tiktoken").unlink()
    untouched = {name: (out / name).stat() for name in train + val if name not in (altered, missing)}

    result = run_cli(*REBUILD_ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (f"rebuilt 3 damaged or missing file(s): {altered} (sha256 " in result.stdout
            and f"{missing} (missing), tokenizer.tiktoken (missing)" in result.stdout), result.stdout
    assert dir_bytes(out) == original
    for name, stat in untouched.items():  # not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    first = 0 if older_manifest else part_number(altered)  # an older manifest: from the start
    assert f"re-encoding parts {first} to {part_number(missing)}" in result.stderr

    again = run_cli(*REBUILD_ARGS, "--out", str(out))
    assert again.returncode == 0 and "already prepared" in again.stdout and again.seconds < 5, again.stderr


def test_rebuild_refuses_a_shard_the_corpus_no_longer_gives(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_texts(30, seed=3)):
        (corpus / f"{i:02d}.txt").write_text(text)
    out = tmp_path / "out"
    args = ["--source", str(corpus), "--tokenizer", "bpe:300", "--shard-tokens", "2000", "--out", str(out)]
    assert run_cli(*args).returncode == 0
    shard = out / "train_00000.bin"
    damaged = bytearray(shard.read_bytes())
    damaged[5] ^= 0x01
    shard.write_bytes(bytes(damaged))
    (corpus / "00.txt").write_text("the corpus changed since")
    result = run_cli(*args)
    assert_one_line_error(result, r"train_00000\.bin: re-encoding the corpus gives .* the manifest records .*"
                                  r"cannot be rebuilt; hint: delete")
    assert shard.read_bytes() == damaged and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
