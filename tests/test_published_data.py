"""A published model's directory through the whole tokenizer side: `python -m data_prep --tokenizer-from HF_DIR` (text
and chat data) on a random tiny `deepseek_v3` model built with transformers plus its tokenizer files, the sampler
and the app replying with the model's own template and stopping at its end of turn, the export writing the original
tokenizer files unchanged, and (multiprocess) a fine-tuning run whose checkpoint carries them."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import LoadedModel, load_for_inference
from gpt_moe.data.chat_batches import Conversations
from gpt_moe.data.chat_template import end_of_turn_ids
from gpt_moe.data.manifest import CONVERSATION_END
from gpt_moe.data.published_tokenizer import read_published
from gpt_moe.data.shards import TokenShards
from gpt_moe.serve.chat import generate_continuation, generate_reply
from gpt_moe.serve.chat_app import ChatApp
from gpt_moe.serve.generate import SamplingConfig
from tests.published import EOS, FIXTURES, deepseek_dir, kimi_dir, with_deepseek_model
from tests.test_data_prep import ROOT, assert_one_line_error, run_cli
from tests.test_published_tokenizer import CONVERSATIONS, apply, prefix_mask, texts

MODEL_VOCAB = 1280  # the model's embedding rows: more than the tokenizer's ids, as DeepSeek-V3's 129280 > 128815
CHATS = [c for c in CONVERSATIONS if c[-1]["role"] == "assistant"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A transformers DeepseekV3ForCausalLM directory (random, tiny) with a DeepSeek-V3-style tokenizer."""
    return with_deepseek_model(deepseek_dir(tmp_path_factory.mktemp("hf") / "DeepSeek-tiny"), MODEL_VOCAB)


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    """The same with a template whose turns end with <|im_end|> (not the EOS token) marked by {% generation %}."""
    return with_deepseek_model(deepseek_dir(tmp_path_factory.mktemp("hf") / "ChatML-tiny",
                                            template="generation.jinja"), MODEL_VOCAB, seed=1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare_chat_data(model_dir: Path, work: Path) -> Path:
    """`python -m data_prep --format chat --tokenizer-from MODEL_DIR` on the test conversations (x4): WORK/chat."""
    rows = write_jsonl(work / "chats.jsonl", [{"messages": m} for m in CHATS * 4])
    prepared = run_cli("--format", "chat", "--source", str(rows), "--tokenizer-from", str(model_dir),
                       "--val-fraction", "0.25", "--out", str(work / "chat"))
    assert prepared.returncode == 0, prepared.stderr
    return work / "chat"


def tokenizer_bytes(directory: Path) -> dict[str, bytes]:
    found = read_published(directory)
    assert found is not None
    return {name: (directory / name).read_bytes() for name in found[1].files}


# --------------------------------------------------------------------------------------------------- data_prep


@pytest.mark.parametrize("kind", ["deepseek", "kimi"])
def test_text_data_from_a_models_directory_holds_autotokenizers_ids(hf_dir, kind, tmp_path):
    """Every document of the shards is AutoTokenizer(text, split_special_tokens=True) then the EOS token (DeepSeek:
    its BOS first); the tokenizer files are copied unchanged and the manifest records them. The Kimi-style
    directory holds the tokenizer files alone (tiktoken.model, no model): that works too."""
    source = hf_dir if kind == "deepseek" else kimi_dir(tmp_path / "kimi")
    rows = write_jsonl(tmp_path / "texts.jsonl", [{"text": text} for text in texts()])
    out = tmp_path / "data"
    result = run_cli("--source", str(rows), "--tokenizer-from", str(source), "--val-fraction", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    reference = transformers.AutoTokenizer.from_pretrained(source)
    expected = [reference(t, split_special_tokens=True)["input_ids"] + [reference.eos_token_id] for t in texts()]
    shards = TokenShards(out)
    assert np.concatenate(shards.tokens("train")).tolist() == [i for ids in expected for i in ids]
    info = read_published(source)[1]
    assert shards.manifest.tokenizer == info and shards.manifest.args["tokenizer_from"] == str(source)
    assert tokenizer_bytes(out) == tokenizer_bytes(source)


def test_chat_data_from_a_models_directory_uses_its_template(hf_dir, tmp_path):
    """Conversations rendered with the model's own template (transformers' ids, prefix-derived masks), each followed
    by the EOS token marked as the conversation's end (DeepSeek's template ends every reply with that token too);
    the manifest records the tokenizer and the template by sha256; the same command verifies, another tokenizer or
    another template is refused."""
    rows = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    out, args = tmp_path / "chat", ["--format", "chat", "--source", str(rows), "--val-fraction", "0"]
    result = run_cli(*args, "--tokenizer-from", str(hf_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert manifest["tokenizer"] == read_published(hf_dir)[1].to_dict()
    assert manifest["chat"]["template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert manifest["chat"]["ends_marked"] is True
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    conversations = Conversations(TokenShards(out), "train")
    assert len(conversations) == len(CHATS)
    for index, messages in enumerate(CHATS):
        ids, mask = conversations.pieces(index)
        assert ids.tolist() == apply(reference, messages) + [reference.eos_token_id]
        assert mask.tolist() == prefix_mask(reference, messages) + [CONVERSATION_END]
    again = run_cli(*args, "--tokenizer-from", str(hf_dir), "--out", str(out))
    assert again.returncode == 0 and "already prepared" in again.stderr
    other = deepseek_dir(tmp_path / "other", template="generation.jinja")
    assert_one_line_error(run_cli(*args, "--tokenizer-from", str(other), "--out", str(out)),
                          r"already holds data tokenized with .*refusing to mix in the tokenizer of")
    edited = tmp_path / "edited"
    shutil.copytree(hf_dir, edited)
    config = json.loads((edited / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("'\\n\\n'", "'\\n'")
    (edited / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    assert_one_line_error(run_cli(*args, "--tokenizer-from", str(edited), "--out", str(out)), r"refusing to mix in")


def test_chat_data_with_a_template_that_hides_the_reply_is_refused_before_anything_is_written(tmp_path):
    source = deepseek_dir(tmp_path / "r1", template="deepseek_r1.jinja")
    rows = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    result = run_cli("--format", "chat", "--source", str(rows), "--tokenizer-from", str(source), "--out",
                     str(tmp_path / "out"))
    assert_one_line_error(result, rf"--tokenizer-from {source}: chat template of r1: assistant turn 1 \(message 3 "
                                  r"of 5\) is not a stable suffix")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- sampler and app


def forced(loaded: LoadedModel, token: int) -> LoadedModel:
    """The model made to predict `token` at every position: every weight zero except one embedding dimension, the
    final norm on it, and the head's row for `token` (attention and experts then add nothing)."""
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.zero_()
        loaded.model.model.embed_tokens.weight[:, 0] = 1.0
        loaded.model.model.norm.weight[0] = 1.0
        loaded.model.lm_head.weight[token, 0] = 1.0
    return loaded


def test_the_sampler_and_the_app_prompt_with_the_models_template(hf_dir):
    """generate_reply (the sampler's and the app's) sends apply_chat_template(..., add_generation_prompt=True)."""
    loaded = load_for_inference(hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    greedy = SamplingConfig(max_new_tokens=3, temperature=0.0)
    for messages in CHATS:
        reply = generate_reply(loaded.model, loaded.tokenizer, messages[:-1], greedy)
        assert reply.prompt.ids == apply(reference, messages[:-1], add_generation_prompt=True)
        assert len(list(reply)) >= 0 and len(reply.token_ids) <= 3
    continuation = generate_continuation(loaded.model, loaded.tokenizer, "def main(", greedy)
    assert continuation.prompt.ids == reference("def main(")["input_ids"]  # the BOS first


def test_replies_stop_at_the_models_end_of_turn(chatml_dir):
    """A model that always writes <|im_end|> (the template's end of turn, not the EOS token) stops at once; one that
    always writes the EOS token stops too; one that writes an ordinary token runs to the limit."""
    reference = transformers.AutoTokenizer.from_pretrained(chatml_dir)
    end_of_turn, eos = reference.convert_tokens_to_ids("<|im_end|>"), reference.eos_token_id
    ordinary = reference("x", add_special_tokens=False)["input_ids"][0]
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    messages = [{"role": "user", "content": "Hi"}]
    for token, reason, count in ((end_of_turn, "stop", 1), (eos, "stop", 1), (ordinary, "length", 5)):
        loaded = forced(load_for_inference(chatml_dir), token)
        reply = generate_reply(loaded.model, loaded.tokenizer, messages, greedy)
        text = "".join(reply)
        assert (reply.finish_reason, reply.token_ids) == (reason, [token] * count)
        assert text == ("" if reason == "stop" else "x" * count)
    loaded = forced(load_for_inference(chatml_dir), end_of_turn)
    assert end_of_turn_ids(loaded.tokenizer) == {end_of_turn}
    app = ChatApp(loaded, chat=True)
    *_, last = app.respond("Hi", [], temperature=0.0)
    assert last[1][-1] == {"role": "assistant", "content": "(empty reply)"}  # ended at once, at <|im_end|>


def test_the_sampler_chats_with_a_transformers_directory(hf_dir):
    result = subprocess.run([sys.executable, "launch/sample.py", "--checkpoint", str(hf_dir), "--chat",
                             "--max-new-tokens", "4", "--temperature", "0", "Hi"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------------ export


def test_export_writes_the_original_tokenizer_files_and_template_unchanged(hf_dir, tmp_path):
    """Our markers are never added to their vocabulary: the exported tokenizer files are the model's bytes, and
    AutoTokenizer.from_pretrained(export) gives the same ids and chat ids; the export loads back with them."""
    out = export(load_for_inference(hf_dir), tmp_path / "export", dtype=torch.float32)
    assert tokenizer_bytes(out) == tokenizer_bytes(hf_dir)
    assert not (out / "tokenizer.tiktoken").exists()
    theirs, original = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, hf_dir))
    for text in texts():
        assert theirs(text)["input_ids"] == original(text)["input_ids"]
    for messages in CHATS:
        assert apply(theirs, messages) == apply(original, messages)
    assert len(theirs) == len(original) and "<|user|>" not in theirs.get_vocab()
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (original.eos_token_id, original.bos_token_id)
    again = load_for_inference(out)
    assert again.tokenizer_info == read_published(hf_dir)[1]
    assert again.tokenizer.decode_single_token_bytes(again.tokenizer.eot) == EOS.encode()


# ------------------------------------------------------------------------------------ fine-tuning round trip


@pytest.mark.multiprocess
def test_a_model_fine_tuned_from_a_transformers_directory_keeps_its_tokenizer(hf_dir, fp32_zero2, tmp_path):
    """--init-from HF_DIR on chat data prepared from it: the checkpoint holds the model's tokenizer files unchanged,
    the sampler chats with it through the model's template, and its export gives AutoTokenizer the same ids."""
    from launching import train

    data = prepare_chat_data(hf_dir, tmp_path)
    run_dir = tmp_path / "sft"
    train("--deepspeed", str(fp32_zero2), "--init-from", str(hf_dir), "--data", str(data), "--run-dir", str(run_dir),
          "--max-steps", "2", "--save-interval", "2", "--seq-len", "128", "--micro-batch", "2", "--eval-interval",
          "2", "--eval-batches", "1", "--sample-tokens", "4", ranks=0)
    tag = next((run_dir / "checkpoints").glob("step_*"))
    assert tokenizer_bytes(tag) == tokenizer_bytes(hf_dir)
    loaded = load_for_inference(run_dir)
    assert loaded.training.chat and loaded.tokenizer_info == read_published(hf_dir)[1]
    sampled = subprocess.run([sys.executable, "launch/sample.py", "--checkpoint", str(run_dir), "--max-new-tokens",
                              "4", "Hi"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr
    out = tmp_path / "export"
    subprocess.run([sys.executable, "launch/export.py", str(run_dir), str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    assert tokenizer_bytes(out) == tokenizer_bytes(hf_dir)
    theirs, original = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, hf_dir))
    assert [theirs(t)["input_ids"] for t in texts()] == [original(t)["input_ids"] for t in texts()]
    assert (FIXTURES / "deepseek_v3.jinja").read_text(encoding="utf-8") == theirs.chat_template
