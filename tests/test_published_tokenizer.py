"""A published model's own tokenizer and chat template, against transformers (`AutoTokenizer`, `apply_chat_template`)
as the oracle: the ids data_prep writes, the ids and loss masks of conversations (from `{% generation %}`, and from
prefixes proved stable for a DeepSeek-V3-style template), the prompts the sampler and the app build, the tokens
that end a reply, and the one-line refusals. Everything is built offline in the test (tests/published.py)."""

from __future__ import annotations

import hashlib
import json
import re
import runpy
import shutil
from pathlib import Path

import pytest
import tiktoken
import transformers

from gpt_moe.data.chat_template import (end_of_text_id, end_of_turn_ids, fit_chat, format_chat, render_conversation,
                                        reply_stop_ids, template_sha256)
from gpt_moe.data.published_tokenizer import (TRANSFORMERS_TIKTOKEN_PATTERN, PublishedTokenizer, load_published,
                                              pattern_in_source, read_published)
from gpt_moe.data.tokenizer import load_saved_tokenizer
from gpt_moe.data.tokenizer_format import TokenizerInfo
from gpt_moe.errors import DataError
from tests.published import ASSISTANT, BOS, EOS, FIXTURES, KIMI_SPECIAL, UNICODE, USER, corpus, deepseek_dir, kimi_dir

MARKER_TEXTS = [
    f"{USER}hi{ASSISTANT}", f"{BOS}text{EOS}", "<think>reasoning</think>answer", "<|im_start|>user\nx<|im_end|>",
    "<|endoftext|> and <|user|>, our own markers", "[BOS] [EOS] [UNK]", "<|im_end|><|im_user|>", "<｜end▁of",
    "partial <｜ markers ｜>", f"<{USER}>", "<｜Assistant｜ almost", "<|im_middle|>assistant",
]
HANDWRITTEN = [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\r\nend", UNICODE, "中文分词测试",
    "日本語のテキスト", "한국어 문장입니다", "emoji 🙂🚀👩‍💻 with a ZWJ sequence", "combining e\u0301 vs precomposed é",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters", "numbers 1234567890 3.14159 1e-10 007", "def f(x):\n    return x ** 2  # square\n",
    "\n\n\n", "   ", "a", "Ünïcödé façade naïve café", "x" * 300, "RTL: עברית العربية",
]


def texts() -> list[str]:
    """50 texts: marker-looking text, Unicode, whitespace, code and prose paragraphs of a standard-library module."""
    paragraphs = [p for p in corpus()[1].split("\n\n") if p.strip()]
    chosen = MARKER_TEXTS + HANDWRITTEN
    return chosen + paragraphs[:50 - len(chosen)]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "Unicode: 中文 🙂"}, {"role": "assistant", "content": "Ünïcödé — ok"}],
    [{"role": "user", "content": "multi\nline\n\n  indented"},
     {"role": "assistant", "content": "def f():\n    return 1\n"}],
    [{"role": "system", "content": "s1"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"},
     {"role": "assistant", "content": "a3"}],
    [{"role": "user", "content": f"marker text {USER} and <think>"},
     {"role": "assistant", "content": f"a reply with {ASSISTANT} and </think> inside"}],
    [{"role": "user", "content": " leading space"}, {"role": "assistant", "content": " leading space reply "}],
    [{"role": "user", "content": "numbers 12345"}, {"role": "assistant", "content": "67890"}],
    [{"role": "user", "content": "an empty reply next"}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
     {"role": "user", "content": "a question left open"}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("published")
    return {"deepseek": deepseek_dir(root / "deepseek"), "generation": deepseek_dir(root / "generation",
                                                                                    template="generation.jinja"),
            "r1": deepseek_dir(root / "r1", template="deepseek_r1.jinja"), "kimi": kimi_dir(root / "kimi"),
            "kimi-generation": kimi_dir(root / "kimi-generation", template="generation.jinja"),
            "kimi-module": kimi_dir(root / "kimi-module", module=True), "bare": deepseek_dir(root / "bare",
                                                                                          template=None)}


def ours(directory: Path) -> PublishedTokenizer:
    found = read_published(directory)
    assert found is not None
    return found[0]


def theirs(directory: Path):
    return transformers.AutoTokenizer.from_pretrained(directory)


# ------------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize("kind", ["deepseek", "kimi"])
def test_document_ids_equal_autotokenizer_on_50_texts(dirs, kind):
    """The data convention: a document is AutoTokenizer(text, split_special_tokens=True) -- the tokenizer's own BOS
    where its post-processor adds one (DeepSeek), text that spells a special token kept as text -- then the EOS
    token that ends every document in token shards."""
    tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
    assert len(texts()) == 50
    for text in texts():
        expected = reference(text, split_special_tokens=True)["input_ids"] + [reference.eos_token_id]
        assert tokenizer.document_ids(text) == expected, text
        assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text
    assert tokenizer.eot == reference.eos_token_id and tokenizer.n_vocab == len(reference)
    assert tokenizer.document_prefix == ((reference.bos_token_id,) if kind == "deepseek" else ())


@pytest.mark.parametrize("kind", ["deepseek", "kimi"])
def test_special_token_text_is_parsed_only_where_transformers_renders_chat(dirs, kind):
    """encode_ordinary keeps marker text as text (transformers without split_special_tokens parses it); the text a
    chat template renders is tokenized as apply_chat_template does, special tokens parsed."""
    tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
    marker = f"say {EOS} now" if kind == "deepseek" else "say [EOS] now"
    parsed = reference(marker, add_special_tokens=False)["input_ids"]
    assert reference.eos_token_id in parsed and tokenizer.eot not in tokenizer.encode_ordinary(marker)
    assert tokenizer.encode_with_special(marker) == parsed


def test_single_tokens_decode_to_their_bytes(dirs):
    """Token by token decoding (the streaming decoder, the routing view) joins to the text, byte-level tokens that
    split a character included."""
    for kind in ("deepseek", "kimi"):
        tokenizer = ours(dirs[kind])
        for text in (UNICODE, "🙂🚀 中文", *MARKER_TEXTS[:3]):
            ids = tokenizer.encode_ordinary(text)
            assert b"".join(tokenizer.decode_single_token_bytes(i) for i in ids).decode() == text
        assert tokenizer.decode_single_token_bytes(tokenizer.eot) == (EOS if kind == "deepseek" else "[EOS]").encode()


def test_the_split_pattern_of_a_kimi_tokenizer_module_is_read_without_running_it(dirs):
    """Kimi / Moonlight name their tokenizer module in auto_map; its pat_str ("|".join of literals, with Unicode
    class intersections) is the split pattern, read from the syntax tree. The model's own class builds a tiktoken
    Encoding from tiktoken.model, that pattern and the added tokens: our ids equal that Encoding's, and differ
    from the default pattern's on Chinese text next to Latin, so the pattern is really used."""
    module = dirs["kimi-module"] / "tokenization_kimi.py"
    expected = runpy.run_path(str(module))["TikTokenTokenizer"].pat_str
    assert pattern_in_source(module.read_text(), str(module)) == expected != TRANSFORMERS_TIKTOKEN_PATTERN
    tokenizer, info = read_published(dirs["kimi-module"])
    assert info.pat_str == expected and "tokenization_kimi.py" in info.files
    ranks = tiktoken.load.load_tiktoken_bpe(str(dirs["kimi-module"] / "tiktoken.model"))
    special = {token: len(ranks) + i for i, token in enumerate(KIMI_SPECIAL)}
    model_class = tiktoken.Encoding("kimi", pat_str=expected, mergeable_ranks=ranks, special_tokens=special)
    for text in texts():
        assert tokenizer.encode_ordinary(text) == model_class.encode_ordinary(text), text
    default = ours(dirs["kimi"])
    assert len(default.encode_ordinary("中文a")) == 1 and len(tokenizer.encode_ordinary("中文a")) == 2


def test_the_record_names_every_file_and_a_copy_loads_with_each_hash_checked(dirs, tmp_path):
    tokenizer, info = read_published(dirs["deepseek"])
    assert info.published and info.format == "tokenizer.json" and set(info.files) == {"tokenizer.json",
                                                                                      "tokenizer_config.json"}
    assert info.eot_id == tokenizer.eot and info.special_tokens[EOS] == tokenizer.eot
    again = TokenizerInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    copy = tmp_path / "copy"
    shutil.copytree(dirs["deepseek"], copy)
    assert load_saved_tokenizer(info, copy).encode_ordinary(UNICODE) == tokenizer.encode_ordinary(UNICODE)
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text().replace("16384", "16385"))
    with pytest.raises(DataError, match=r"tokenizer_config.json: sha256 .* differs from the recorded"):
        load_published(info, copy)


def test_a_tokenizer_without_the_eos_it_names_is_refused_in_one_line(dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dirs["deepseek"], broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["eos_token"] = "<｜no▁such▁token｜>"
    (broken / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    with pytest.raises(DataError, match=r"names no eos_token in the vocabulary \('<｜no▁such▁token｜>'\)") as err:
        read_published(broken)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ chat template


def apply(reference, messages, **kwargs) -> list[int]:
    return reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("kind", ["generation", "kimi-generation"])
def test_generation_blocks_give_transformers_ids_and_assistant_masks(dirs, kind):
    """Token offsets from HF tokenizers (tokenizer.json) and from tiktoken (tiktoken.model) alike."""
    tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        ids, mask = render_conversation(tokenizer, messages)
        assert ids == expected["input_ids"] and mask == expected["assistant_masks"], messages
    ids, mask = render_conversation(tokenizer, CONVERSATIONS[0])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<|im_end|>"


def prefix_mask(reference, messages) -> list[int]:
    """The oracle of the prefix-derived mask, computed with transformers: assistant message i spans what rendering
    messages[:i + 1] adds to messages[:i] rendered with the generation prompt."""
    full = apply(reference, messages)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(apply(reference, messages[:i], add_generation_prompt=True)), len(apply(reference,
                                                                                                   messages[:i + 1]))
            mask[start:end] = [1] * (end - start)
    return mask


@pytest.mark.parametrize("kind", ["deepseek", "kimi"])
def test_a_template_without_generation_blocks_masks_each_stable_assistant_span(dirs, kind):
    """DeepSeek-V3's template (BOS, <｜User｜>, <｜Assistant｜>, every reply closed by <｜end▁of▁sentence｜>) and
    Moonlight's (turns closed by <|im_end|>): transformers' ids, and the mask equals the prefix-derived spans --
    each assistant message's text and the token that ends its turn, nothing else."""
    tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
    for messages in CONVERSATIONS:
        ids, mask = render_conversation(tokenizer, messages)
        assert ids == apply(reference, messages) and mask == prefix_mask(reference, messages), messages
    ids, mask = render_conversation(tokenizer, CONVERSATIONS[1])
    end = EOS if kind == "deepseek" else "<|im_end|>"
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == f"4{end}6{end}"
    assert ids[0] == tokenizer.bos if kind == "deepseek" else ids[0] != tokenizer.bos


def test_a_template_whose_assistant_span_is_not_a_stable_suffix_is_refused_in_one_line(dirs):
    """DeepSeek-R1's generation prompt opens a thinking block the rendered turn lacks: no prefix proves the span."""
    tokenizer = ours(dirs["r1"])
    with pytest.raises(DataError) as err:
        render_conversation(tokenizer, CONVERSATIONS[1])
    assert re.fullmatch(r"chat template of r1: assistant turn 1 \(message 3 of 5\) is not a stable suffix of the "
                        r"conversation: the generation prompt's tokens do not begin the rendered turn, .*"
                        r"\{% generation %\}", str(err.value))
    with pytest.raises(DataError, match="assistant turn 1"):
        tokenizer.chat.check()


def test_a_model_without_a_chat_template_cannot_render_conversations(dirs):
    with pytest.raises(DataError, match=r"tokenizer 'bare' has no chat template"):
        render_conversation(ours(dirs["bare"]), CONVERSATIONS[0])


@pytest.mark.parametrize("kind", ["deepseek", "generation", "kimi"])
def test_prompts_equal_apply_chat_template_with_the_generation_prompt(dirs, kind):
    """What the sampler and the app send the model (format_chat, fit_chat) is transformers' prompt."""
    tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
    for messages in CONVERSATIONS:
        asked = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        expected = apply(reference, asked, add_generation_prompt=True)
        assert format_chat(tokenizer, asked) == expected
        prompt = fit_chat(tokenizer, asked, 10_000)
        assert prompt.ids == expected and prompt.dropped_messages == 0 and not prompt.truncated


def test_fit_chat_drops_the_oldest_turns_keeps_the_system_message_then_cuts_the_text(dirs):
    tokenizer, reference = ours(dirs["deepseek"]), theirs(dirs["deepseek"])
    messages = CONVERSATIONS[4][:-1]
    budget = len(apply(reference, [messages[0], *messages[-1:]], add_generation_prompt=True))
    prompt = fit_chat(tokenizer, messages, budget)
    assert prompt.ids == apply(reference, [messages[0], *messages[-1:]], add_generation_prompt=True)
    assert prompt.dropped_messages == len(messages) - 2 and not prompt.truncated
    long = [{"role": "user", "content": "word " * 200 + "the end"}]
    prompt = fit_chat(tokenizer, long, 40)
    assert prompt.truncated and len(prompt.ids) <= 40 and tokenizer.decode(prompt.ids).endswith(f"the end{ASSISTANT}")
    assert prompt.ids[0] == tokenizer.bos


def test_replies_end_at_the_models_end_of_turn_and_eos(dirs):
    """The stop ids: the special token that closes an assistant turn in the model's template and the EOS token;
    documents end at the EOS token."""
    for kind, end in (("deepseek", EOS), ("generation", "<|im_end|>"), ("kimi", "<|im_end|>")):
        tokenizer, reference = ours(dirs[kind]), theirs(dirs[kind])
        end_id = reference.convert_tokens_to_ids(end)
        assert end_of_turn_ids(tokenizer) == {end_id}
        assert reply_stop_ids(tokenizer) == {end_id, reference.eos_token_id}
        assert end_of_text_id(tokenizer) == reference.eos_token_id


def test_the_template_identity_is_the_sha256_of_the_models_own_template(dirs):
    text = (FIXTURES / "deepseek_v3.jinja").read_text(encoding="utf-8")
    assert template_sha256(ours(dirs["deepseek"])) == hashlib.sha256(text.encode()).hexdigest()
    assert template_sha256(ours(dirs["deepseek"])) != template_sha256(ours(dirs["generation"])) != template_sha256()


def test_a_chat_template_jinja_file_is_the_template(dirs, tmp_path):
    """chat_template.jinja (how transformers 5 saves templates) wins over tokenizer_config.json's, as in
    transformers."""
    directory = tmp_path / "jinja"
    shutil.copytree(dirs["deepseek"], directory)
    shutil.copyfile(FIXTURES / "generation.jinja", directory / "chat_template.jinja")
    tokenizer, info = read_published(directory)
    assert "chat_template.jinja" in info.files
    expected = theirs(directory).apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
    assert list(render_conversation(tokenizer, CONVERSATIONS[1])) == [expected["input_ids"],
                                                                       expected["assistant_masks"]]
