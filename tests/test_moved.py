"""The 0.1 import paths keep working for one release (`gpt_moe.moved`): every old module imports, warns once with its
new home, and gives the objects of the new modules; `python -m gpt_moe.params` runs the new command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpt_moe.moved import MOVED, PACKAGES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import importlib, sys, warnings
for old in sys.argv[1:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert [str(w.message) for w in caught if w.category is DeprecationWarning and old in str(w.message)], old
from gpt_moe.chat import ReplyStream, render_conversation
from gpt_moe.data import TokenShards
from gpt_moe.generate import SamplingConfig, SelfSpeculativeDecoder
from gpt_moe.hardware import deepspeed_cuda_arch_list
from gpt_moe.loading import load_for_inference
from gpt_moe.model import DeepSeekForCausalLM
import gpt_moe.data.chat_template, gpt_moe.serve.chat, gpt_moe.data.shards, gpt_moe.serve.generate
import gpt_moe.train.hardware, gpt_moe.checkpoint.loading, gpt_moe.model.model
assert ReplyStream is gpt_moe.serve.chat.ReplyStream
assert render_conversation is gpt_moe.data.chat_template.render_conversation
assert TokenShards is gpt_moe.data.shards.TokenShards
assert SelfSpeculativeDecoder is gpt_moe.serve.generate.SelfSpeculativeDecoder
assert deepspeed_cuda_arch_list is gpt_moe.train.hardware.deepspeed_cuda_arch_list
assert load_for_inference is gpt_moe.checkpoint.loading.load_for_inference
assert DeepSeekForCausalLM is gpt_moe.model.model.DeepSeekForCausalLM
from gpt_moe.data import shards  # a submodule of the package, not an old name
assert shards is gpt_moe.data.shards
print("ok")
"""


def test_every_old_module_imports_warns_and_gives_the_new_objects():
    result = subprocess.run([sys.executable, "-c", SCRIPT, *MOVED], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert set(PACKAGES) == {"gpt_moe.model", "gpt_moe.data", "gpt_moe.checkpoint"}


def test_the_old_params_command_runs_the_new_one_and_says_so():
    new = subprocess.run([sys.executable, "-m", "gpt_moe.model.params", "tiny", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    old = subprocess.run([sys.executable, "-m", "gpt_moe.params", "tiny", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert new.returncode == old.returncode == 0 and old.stdout == new.stdout and new.stdout.strip()
    assert "gpt_moe.params moved to gpt_moe.model.params" in old.stderr
