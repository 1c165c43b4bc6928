"""Fine-tuning a published model, end to end: a random DeepSeek-V2-Lite-like transformers directory (softmax
routing, no q-LoRA, one tensor per routed expert) with a DeepSeek-style tokenizer and chat template, chat data
prepared in its vocabulary and template, two ranks with EP=2 fine-tuning it, the export read back by transformers
(the same greedy reply as `launch/sample.py` gives from the checkpoint), and the app chatting with the export in
a real browser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.published import deepseek_dir, with_deepseek_model
from tests.test_app_browser import REPLY_DONE, bot_text, browsing, send, serving, set_number
from tests.test_data_prep import ROOT
from tests.test_published_data import prepare_chat_data

MODEL_VOCAB = 1280  # embedding rows beyond the tokenizer's ids, as DeepSeek-V2-Lite's 102400 > its tokenizer's
PROMPT = "How do I reverse a list in Python?"
REPLY_TOKENS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return with_deepseek_model(deepseek_dir(tmp_path_factory.mktemp("hf") / "DeepSeek-V2-Lite-tiny"), MODEL_VOCAB,
                               model_type="deepseek_v2")


@pytest.fixture(scope="module")
def fine_tuned(base, fp32_zero2, tmp_path_factory) -> dict[str, Path]:
    """Chat data in its own tokenizer and template; 2 ranks, EP=2, ZeRO-2, fp32, 4 steps of 2 rows; the export."""
    from launching import train

    work = tmp_path_factory.mktemp("sft")
    data = prepare_chat_data(base, work)
    run_dir = work / "run"
    train("--deepspeed", str(fp32_zero2), "--init-from", str(base), "--data", str(data), "--run-dir", str(run_dir),
          "--ep-size", "2", "--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "0", "--save-interval", "4",
          "--seq-len", "128", "--micro-batch", "1", "--eval-interval", "4", "--eval-batches", "1", "--sample-tokens",
          "0", ranks=2)
    export = work / "export"
    subprocess.run([sys.executable, "launch/export.py", str(run_dir), str(export)], cwd=ROOT, check=True,
                   capture_output=True)
    return {"run": run_dir, "export": export}


def sampled_reply(checkpoint: Path) -> str:
    result = subprocess.run([sys.executable, "launch/sample.py", "--checkpoint", str(checkpoint), "--temperature",
                             "0", "--repetition-penalty", "1", "--max-new-tokens", str(REPLY_TOKENS), PROMPT],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


@pytest.mark.multiprocess
def test_a_v2_model_fine_tuned_on_its_own_template_replies_the_same_in_transformers(base, fine_tuned):
    """The export is a deepseek_v2 directory whose weights moved; transformers' greedy reply to a chat prompt built
    by the model's template equals sample.py's from the training checkpoint (ids past the tokenizer's vocabulary
    suppressed in both: ours never samples them)."""
    export = fine_tuned["export"]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["architectures"] == ["DeepseekV2ForCausalLM"]
    before = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    after = model.state_dict()
    assert after.keys() == before.keys()
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert any(".mlp.experts." in k for k in moved) and any("self_attn" in k for k in moved), moved[:10]

    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=REPLY_TOKENS, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                             suppress_tokens=list(range(len(tokenizer), MODEL_VOCAB)))
    new = out[0, len(prompt):].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        new = new[:-1]  # the end of its turn: ours stops there without printing it
    theirs = tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert theirs, "an empty reply compares nothing: choose another PROMPT"
    assert sampled_reply(fine_tuned["run"]) == theirs
    assert sampled_reply(export) == theirs


@pytest.mark.multiprocess
@pytest.mark.browser
def test_the_app_chats_with_the_fine_tuned_export(fine_tuned, tmp_path):
    """app.py on the export: the page sends a message and shows the model's greedy reply, as sample.py gives it."""
    expected = sampled_reply(fine_tuned["export"])
    with serving(fine_tuned["export"], tmp_path / "app.log") as server, browsing(server["url"]) as page:
        set_number(page, "temperature", 0)
        set_number(page, "repetition-penalty", 1)
        set_number(page, "max-new-tokens", REPLY_TOKENS)
        send(page, PROMPT)
        page.wait_for_function(REPLY_DONE, timeout=60_000)
        shown = bot_text(page)
        from gradio_client import Client

        answer = Client(server["url"], verbose=False).predict(PROMPT, [], 0.0, 0, 1.0, REPLY_TOKENS, 0, 1.0, "",
                                                              api_name="/chat")
    assert shown.strip(), "the page shows no reply"
    history = answer[1]
    assert [m["role"] for m in history] == ["user", "assistant"]
    reply = history[1]["content"]
    reply = reply if isinstance(reply, str) else reply[0]["text"]
    assert reply == expected.strip()  # gradio's Chatbot strips a message's surrounding whitespace
