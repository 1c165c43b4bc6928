"""The README's benchmark commands run (at toy sizes) and print their side-by-side ratios. No timing
is asserted: the figures belong in the README, measured on an idle machine."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, expected", [
    pytest.param(["moe", "--tokens", "128", "--hidden", "64", "--expert-size", "32", "--repeats", "1"],
                 ["ours/dense", "64/6/2", "16/2/1"], id="moe"),
    pytest.param(["decode", "--contexts", "32", "--batches", "1", "2", "--steps", "2", "--rounds", "1",
                  "--samples", "2"],
                 ["latent/expanded", "cache per token: MLA latent 640 B", "speculative/latent", "needed for 1.4x"],
                 id="decode"),
    pytest.param(["train", "--seq-len", "32", "--micro-batch", "2", "--steps", "1"],
                 ["gpt-moe / transformers:", "MFU"], id="train"),
    pytest.param(["data", "--rounds", "1", "--workers", "1"], ["data_prep --workers 1", "peak memory"], id="data"),
    pytest.param(["compile", "--micro-batch", "2", "--seq-len", "32", "--rounds", "1"],
                 ["first compiled step", "compiled speed-up"], id="compile"),
])
def test_benchmark_runs_and_prints_its_ratios(args, expected):
    result = subprocess.run([sys.executable, "launch/bench.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout, result.stdout[-2000:]


def test_the_profile_accounts_for_the_whole_step():
    """`bench.py profile`: every part named, and the parts (casts are "of which") add up to the profiled step."""
    result = subprocess.run([sys.executable, "launch/bench.py", "profile", "--seq-len", "32", "--micro-batch", "2",
                             "--steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-5].replace(".", "").isdigit():
            rows[line[:44].strip()] = (float(fields[-5]), float(fields[-3]))
    for part in ("attention", "router", "routed experts", "dispatch", "head + loss", "optimizer step",
                 "backward: grouped matmul", "of which casts (aten::_to_copy)"):
        assert part in rows, result.stdout
    step = rows.pop("step (forward + backward + optimizer)")
    rows.pop("of which casts (aten::_to_copy)")
    for column in (0, 1):
        assert sum(r[column] for r in rows.values()) == pytest.approx(step[column], rel=0.01, abs=0.3)
    assert "bf16 step speed over fp32:" in result.stdout


def test_sft_benchmark_runs_and_prints_its_ratio(prepared_data, tmp_path):
    chat = tmp_path / "chat"
    subprocess.run([sys.executable, "-m", "data_prep", "--format", "chat", "--source", "builtin-chat",
                    "--tokenizer-from", str(prepared_data), "--out", str(chat), "--no-progress"], cwd=REPO, check=True,
                   capture_output=True)
    result = subprocess.run([sys.executable, "launch/bench.py", "sft", "--data", str(chat), "--micro-batch", "1",
                             "--steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning / pretraining:" in result.stdout and "padding of the packed rows" in result.stdout
