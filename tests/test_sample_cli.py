"""launch/sample.py as a user runs it: a subprocess on a tiny checkpoint, prompt from argv or stdin;
its error messages through `main` in this process (one line on stderr, exit status 2)."""

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "sample.py"


def start(*args: str, stdin: str = "") -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdin.write(stdin)
    process.stdin.close()
    return process


def finish(process: subprocess.Popen) -> str:
    out = process.stdout.read()
    assert process.wait(timeout=60) == 0, process.stderr.read()
    return out


def test_prompt_from_argv_or_stdin_gives_the_same_seeded_text(tiny_checkpoint):
    options = ["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "16", "--seed", "7", "--temperature", "1"]
    runs = [start(*options, "The quick brown fox"), start(*options, stdin="The quick brown fox"),
            start("--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "8", "--chat", "--system", "Be brief.",
                  "--temperature", "0", stdin="Hello <|user|>")]
    from_argv, from_stdin, chat = (finish(p) for p in runs)  # the three run side by side
    assert from_argv == from_stdin and from_argv.strip()
    assert chat.endswith("\n")


@pytest.fixture(scope="module")
def sample_main():
    spec = importlib.util.spec_from_file_location("launch_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args, stdin, expected", [
    (["--checkpoint", "{missing}", "hello"], "", "no checkpoint here"),
    (["--checkpoint", "{ckpt}", "--max-new-tokens", "100000", "hello"], "", "max new tokens 100000"),
    (["--checkpoint", "{ckpt}", "--top-p", "0", "hello"], "", "--top-p must be in"),
    (["--checkpoint", "{ckpt}"], "", "empty prompt"),
    (["--checkpoint", "{ckpt}", "--speculative", "--draft-tokens", "0", "hello"], "", "--draft-tokens 0: expected"),
])
def test_errors_are_one_line(sample_main, tiny_checkpoint, tmp_path, monkeypatch, capsys,
                             args, stdin, expected):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    args = [a.format(missing=tmp_path / "nowhere", ckpt=tiny_checkpoint) for a in args]
    assert sample_main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_speculative_greedy_prints_the_plain_text_and_the_acceptance(tiny_checkpoint):
    """The exported checkpoint carries its MTP block in mtp.safetensors; greedy text is the same either way."""
    options = ["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "24", "--temperature", "0", "def add("]
    speculative = start("--speculative", "--draft-tokens", "2", *options)
    plain_text = finish(start(*options))
    assert finish(speculative) == plain_text
    report = speculative.stderr.read()
    assert "MTP draft acceptance" in report and "tokens per forward" in report, report


def test_speculative_without_an_mtp_block_is_one_line(sample_main, tmp_path, monkeypatch, capsys):
    from conftest import make_tiny_export

    no_mtp = make_tiny_export(tmp_path / "no_mtp", num_nextn_predict_layers=0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert sample_main(["--checkpoint", str(no_mtp), "--speculative", "hello"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--speculative" in err and "no MTP block" in err, err
