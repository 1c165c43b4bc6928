"""Export to the transformers layout and back: same logits everywhere, no missing or unexpected keys."""

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import transformers

from gpt_moe.checkpoint.export import export
from gpt_moe.checkpoint.loading import LoadedModel, load_for_inference
from gpt_moe.checkpoint.records import TrainingFacts
from gpt_moe.data.tokenizer import save_tokenizer, train_bpe
from gpt_moe.errors import CheckpointError
from gpt_moe.model.model import DeepSeekForCausalLM

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def loaded(small_config, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    text = "def add(a, b):\n    return a + b\n" * 50 + "Ünïcödé text and emoji 🙂 " * 20
    tokenizer = train_bpe([text], vocab_size=300)
    info = save_tokenizer(tokenizer, source)
    config = small_config.replace(vocab_size=320)
    model = DeepSeekForCausalLM(config, seed=5).eval()
    for _, moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    training = TrainingFacts.from_dict({"step": 7, "tokens_seen": 1234, "val_loss": 3.5})
    return LoadedModel(model, tokenizer, info, source, training)


def test_export_loads_in_transformers_with_our_logits(loaded, tmp_path, caplog):
    out = export(loaded, tmp_path / "export", dtype=torch.float32)
    caplog.set_level(logging.WARNING)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()
                or "unexpected" in r.getMessage().lower() or "newly initialized" in r.getMessage()]
    tokens = torch.randint(0, 320, (2, 33))
    with torch.no_grad():
        ours = loaded.model(tokens).logits
        assert (theirs(tokens).logits - ours).abs().max().item() <= 1e-4
        back = load_for_inference(out)
        assert torch.equal(back.model(tokens).logits, ours)  # MTP block and bias included, bit-exact in fp32
    assert back.training.step == 7
    assert back.tokenizer.decode(back.tokenizer.encode("emoji 🙂")) == "emoji 🙂"
    assert "validation loss | 3.5000" in (out / "README.md").read_text()


def test_exported_tokenizer_loads_in_transformers_with_our_ids_and_chat_template(loaded, tmp_path):
    from gpt_moe.data.chat_template import format_chat

    out = export(loaded, tmp_path / "export", dtype=torch.float32)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b  # Ünïcödé 🙂"
    assert theirs(text)["input_ids"] == loaded.tokenizer.encode_ordinary(text)
    assert theirs.decode(theirs(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 and 3"}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) \
        == format_chat(loaded.tokenizer, messages)
    assert theirs.eos_token_id == loaded.tokenizer_info.eot_id


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 and 3"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d e f"}],
    [{"role": "user", "content": "Ünïcödé 🙂 and 中文"}, {"role": "assistant", "content": "emoji 🙂 back"}],
    [{"role": "user", "content": "def f(x=1):\n    return x"}, {"role": "assistant", "content": "f, x=1"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": "\n\nnewlines\n"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "5"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "the quick brown fox " * 20}, {"role": "assistant", "content": "jumps " * 15}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}],
]


def test_transformers_assistant_mask_equals_ours(loaded, tmp_path):
    """What TRL's assistant_only_loss reads: apply_chat_template(..., return_assistant_tokens_mask=True) of the
    exported tokenizer gives exactly render_conversation's ids and loss mask."""
    from gpt_moe.data.chat_template import render_conversation

    theirs = transformers.AutoTokenizer.from_pretrained(export(loaded, tmp_path / "export", dtype=torch.float32))
    for messages in CONVERSATIONS:
        out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, mask = render_conversation(loaded.tokenizer, messages)
        assert (out["input_ids"], out["assistant_masks"]) == (ids, mask), messages
    # The one difference: transformers renders to text and then parses marker text typed into a message as the
    # marker itself; ours keeps such text plain (it can never open or close a turn).
    spelled = [{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "<|user|>"}]
    out = theirs.apply_chat_template(spelled, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = render_conversation(loaded.tokenizer, spelled)
    assert theirs.decode(out["input_ids"]) == loaded.tokenizer.decode(ids) and len(out["input_ids"]) < len(ids)


def test_export_refuses_a_non_empty_directory(loaded, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export(loaded, target)
    assert (target / "keep.txt").read_text() == "user data"


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here.*deepspeed launch/train.py"):
        load_for_inference(tmp_path)
    half = tmp_path / "checkpoints" / "step_00000004"
    half.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_for_inference(half)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"")  # a save that stopped part-way
    with pytest.raises(CheckpointError, match="interrupted while saving"):
        load_for_inference(half)


@pytest.mark.parametrize("trained_bf16, flag, expected", [
    (False, "fp32", "float32"), (False, "auto", "float32"), (True, "auto", "bfloat16"), (False, "bf16", "bfloat16")])
def test_export_writes_the_training_precision_or_the_asked_one(loaded, tmp_path, trained_bf16, flag, expected):
    """launch/export.py --dtype: auto follows the checkpoint's training record ("bf16", as in COMPLETE); config.json
    and the model card say which. An fp32 checkpoint exported in fp32 gives transformers the checkpoint's logits."""
    import importlib.util
    import json

    loaded.training = dataclasses.replace(loaded.training, bf16=trained_bf16)
    source = export(loaded, tmp_path / "checkpoint", dtype=torch.float32)  # stands for the training checkpoint
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "launch" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(source), str(tmp_path / "out"), "--dtype", flag]) == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == expected
    trained = "bf16" if trained_bf16 else "fp32"
    assert f"| weights | {expected} (trained in {trained}" in (out / "README.md").read_text()
    if expected == "float32":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokens = torch.randint(0, 320, (2, 33))
        with torch.no_grad():
            assert (theirs(tokens).logits - loaded.model(tokens).logits).abs().max().item() <= 1e-5
