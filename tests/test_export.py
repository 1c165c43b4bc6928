"""Export to the transformers layout and back: same logits everywhere, no missing or unexpected keys."""

import logging

import pytest
import torch

from gpt_moe.loading import LoadedModel, load_for_inference
from gpt_moe.errors import CheckpointError
from gpt_moe.export import export
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.tokenizer import save_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")


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
    return LoadedModel(model, tokenizer, info, source, {"step": 7, "tokens_seen": 1234, "val_loss": 3.5})


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
    assert back.info["step"] == 7
    assert back.tokenizer.decode(back.tokenizer.encode("emoji 🙂")) == "emoji 🙂"
    assert "validation loss | 3.5000" in (out / "README.md").read_text()


def test_exported_tokenizer_loads_in_transformers_with_our_ids_and_chat_template(loaded, tmp_path):
    from gpt_moe.chat import format_chat

    out = export(loaded, tmp_path / "export", dtype=torch.float32)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b  # Ünïcödé 🙂"
    assert theirs(text)["input_ids"] == loaded.tokenizer.encode_ordinary(text)
    assert theirs.decode(theirs(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 and 3"}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) \
        == format_chat(loaded.tokenizer, messages)
    assert theirs.eos_token_id == loaded.tokenizer_info.eot_id


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
