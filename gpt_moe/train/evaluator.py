"""Evaluation inside a training run, every rank together: the figures of `gpt_moe.checkpoint.evaluation`
(validation loss and bits per byte, a chat run's end-of-turn probability, the MTP block's draft acceptance and, with
the suite on, HumanEval's canonical solutions in bits per byte), a text sample, and for an `--init-from` run the
routing drift from the parent measured before step 1 (`ParentRouting`).

Every rank calls each of these together: the experts and ZeRO-3's parameter shards live on several ranks, so the
model only runs with all of them. Nothing here changes the model or the data position.

    evaluator = Evaluator(engine, val_batches, chat, tokenizer, context, sample_tokens, suite=True)
    result = evaluator.evaluate(step)        # EvaluationResult(evaluation, loads, sample)
    parent = ParentRouting.measured(evaluator.evaluate(0), engine.module)   # before step 1 of an --init-from run
    parent.compare(evaluator.evaluate(step), engine.module)    # the Evaluation with its drift and its parent's
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gpt_moe.atomic import write_atomic
from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.data.bits_per_byte import token_byte_lengths
from gpt_moe.data.chat_batches import ChatValBatches
from gpt_moe.data.chat_template import continuation_prompt, end_of_turn_ids, format_chat
from gpt_moe.data.humaneval import solution_batches, suite_problems
from gpt_moe.data.shards import ValBatches
from gpt_moe.data.validation import ValidationTotals, acceptance, mtp_counts, validation_totals
from gpt_moe.errors import CheckpointError
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.routing_drift import layer_drifts
from gpt_moe.train.engine import Distributed

log = logging.getLogger(__name__)
SAMPLE_QUESTION = "What does the function len do?"  # asked at each evaluation of a chat fine-tuning run
SAMPLE_PROMPT = "def "  # continued at each evaluation of a pretraining run
PARENT_FILE = "parent_evaluation.json"
"""runs/<run>/PARENT_FILE: an --init-from run's parent as measured before step 1 (`ParentRouting`)."""


def greedy_uncached(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    vocab_limit: int | None = None) -> torch.Tensor:
    """input_ids: [batch, prompt] -> [batch, prompt + max_new_tokens], argmax of a full forward each step
    (over the first `vocab_limit` ids: a model may have more embedding rows than its tokenizer has tokens).
    Slow, but it needs nothing but `forward`, so it runs inside a training engine whose parameters are sharded
    (ZeRO-3) or whose experts live on other ranks; the tests hold the latent-cache decoder to it."""
    ids = input_ids
    for _ in range(max_new_tokens):
        next_id = model(ids).logits[:, -1, :vocab_limit].argmax(dim=-1, keepdim=True)
        ids = torch.cat((ids, next_id), dim=1)
    return ids


@dataclass(frozen=True)
class EvaluationResult:
    evaluation: Evaluation  # the figures (no drift yet: `ParentRouting.compare` adds it)
    loads: torch.Tensor | None  # [main MoE layers, routed experts] of the validation tokens, all ranks; None: none
    sample: str | None  # None when --sample-tokens is 0, or for the validation pass alone


class Evaluator:
    """The evaluations of one run. `val_batches` is None for data without a validation split; `suite`: score the
    HumanEval subset too (`gpt_moe.data.humaneval.SUITE_PROBLEMS`; left out, logged once, when the package is
    missing or the tokenizer cannot encode it)."""

    def __init__(self, engine, val_batches: ValBatches | ChatValBatches | None, chat: bool, tokenizer,
                 context: Distributed, sample_tokens: int, suite: bool = False, tokens_per_batch: int = 4096) -> None:
        self.engine, self.val_batches, self.chat = engine, val_batches, chat
        self.tokenizer, self.context, self.sample_tokens = tokenizer, context, sample_tokens
        self.device = context.device
        self.byte_lengths = token_byte_lengths(tokenizer, engine.module.config.vocab_size).to(self.device)
        self.main_moe = engine.module.moe_layers(include_mtp=False)
        self.end_ids = sorted(end_of_turn_ids(tokenizer)) if chat else []
        self.problems, self.problem_batches = [], []
        if suite:
            self.problems, why_not = suite_problems(tokenizer)
            if why_not and context.is_rank0:
                log.warning("HumanEval is left out of the evaluations: %s", why_not)
            self.problem_batches, _ = solution_batches(tokenizer, self.problems,
                                                       engine.module.config.max_position_embeddings, tokens_per_batch)

    def evaluate(self, step: int, validation_only: bool = False) -> EvaluationResult:
        """Every figure of this run at `step` (with `validation_only`, the validation pass alone)."""
        figures, loads, sample = {}, None, None
        self.engine.eval()
        try:
            if self.val_batches is not None:
                totals = self.validation()
                figures.update(totals.figures())
                loads = totals.loads if self.main_moe else None
                mtp = None if validation_only else self.mtp_acceptance()
                figures.update({"mtp_acceptance": mtp} if mtp is not None else {})
            if self.problems and not validation_only:
                figures.update(self.humaneval())
            if self.sample_tokens and not validation_only:
                sample = self.sample_text()
        finally:
            self.engine.train()
        return EvaluationResult(Evaluation(figures, step), loads, sample)

    def validation(self) -> ValidationTotals:
        """The validation pass over all ranks: losses, bytes, end-of-turn probabilities, the main layers' loads."""
        totals = validation_totals(self.engine, self.val_batches, self.device, self.byte_lengths, self.end_ids,
                                   self.main_moe)
        return totals.map(self.context.all_reduce)

    def mtp_acceptance(self) -> float | None:
        """Teacher-forced share of validation positions where the MTP block's top token for the token after next
        is the main model's (`gpt_moe.model.mtp_acceptance`); None without an MTP block or counted positions."""
        if not self.engine.module.config.num_nextn_predict_layers:
            return None
        return acceptance(self.context.all_reduce(mtp_counts(self.engine.module, self.val_batches, self.device)).cpu())

    def humaneval(self) -> dict[str, float]:
        """Bits per byte of the subset's canonical solutions (packed a few to a row, rows as many to a batch as a
        training micro-batch holds): rank r scores batches r, r + world, ...; a rank with fewer runs as many
        forwards as the busiest all the same (not counted), since every forward needs every rank."""
        batches, world = self.problem_batches, self.context.world
        mine = batches[self.context.rank::world]
        totals = validation_totals(self.engine, mine, self.device, self.byte_lengths)
        validation_totals(self.engine, batches[:math.ceil(len(batches) / world) - len(mine)], self.device,
                          self.byte_lengths)  # not counted
        totals = totals.map(self.context.all_reduce)
        return {"humaneval_bpb": totals.bits_per_byte, "humaneval_problems": float(len(self.problems))}

    @torch.no_grad()
    def sample_text(self) -> str:
        """Greedy continuation of a fixed prompt, or for a chat run the reply to a fixed question."""
        tokenizer = self.tokenizer
        if self.chat:  # a reply through the chat template (the model's own, for a published model): the reply shown
            prompt = format_chat(tokenizer, [{"role": "user", "content": SAMPLE_QUESTION}])
            shown = len(prompt)
        else:  # the prompt's text and its continuation (a published model's BOS first, not shown)
            prompt = continuation_prompt(tokenizer, SAMPLE_PROMPT, 1 << 20).ids
            shown = len(prompt) - len(tokenizer.encode_ordinary(SAMPLE_PROMPT))
        ids = greedy_uncached(self.engine.module, torch.tensor([prompt], device=self.device), self.sample_tokens,
                              vocab_limit=tokenizer.n_vocab)
        text = tokenizer.decode(ids[0, shown:].tolist())
        return f"{SAMPLE_QUESTION} -> {text}" if self.chat else text


def routing_biases(model: DeepSeekForCausalLM) -> torch.Tensor:
    """[main MoE layers, routed experts] fp32 on the CPU: the balancing biases."""
    return torch.stack([moe.gate.e_score_correction_bias.detach().float().cpu() for _, moe in model.moe_layers(False)])


@dataclass(frozen=True)
class ParentRouting:
    """An --init-from run's parent, measured before step 1 on the validation tokens: its evaluation, and per main MoE
    layer its expert loads and balancing biases (what the routing drift is measured from). Rank 0 keeps it in
    runs/<run>/PARENT_FILE, so a resumed run still compares with it."""

    evaluation: Evaluation
    layers: list[int]
    loads: list[list[int]]  # [layers, routed experts]
    biases: list[list[float]]

    @classmethod
    def measured(cls, result: EvaluationResult, model: DeepSeekForCausalLM) -> ParentRouting:
        loads = result.loads.tolist() if result.loads is not None else []
        return cls(result.evaluation, [layer for layer, _ in model.moe_layers(False)], loads,
                   routing_biases(model).tolist() if loads else [])

    def compare(self, result: EvaluationResult, model: DeepSeekForCausalLM) -> Evaluation:
        """`result`'s evaluation with the parent's figures and, when it routed the same tokens (the validation
        batches depend on the ranks and micro-batch: a resume on another layout reads others), the drift."""
        evaluation = replace(result.evaluation, parent=self.evaluation)
        if result.loads is None or not self.loads or result.loads.sum(dim=1).tolist() != [sum(r) for r in self.loads]:
            return evaluation
        drift = layer_drifts(self.layers, self.loads, result.loads, self.biases, routing_biases(model))
        return replace(evaluation, drift=tuple(drift))

    def save(self, run_dir: Path) -> None:
        data = {"evaluation": self.evaluation.to_dict(), "layers": self.layers, "loads": self.loads,
                "biases": self.biases}
        write_atomic(run_dir / PARENT_FILE, json.dumps(data))

    @classmethod
    def load(cls, run_dir: Path) -> ParentRouting | None:
        """The parent measured when the run started; None (with a warning) when the file is missing or unreadable."""
        path = run_dir / PARENT_FILE
        try:
            data = json.loads(path.read_text())
            return cls(Evaluation.from_dict(data["evaluation"], str(path)), [int(i) for i in data["layers"]],
                       data["loads"], data["biases"])
        except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
            log.warning("%s: cannot read the parent's evaluation (%s): no routing drift or parent figures in this "
                        "run's evaluations", path, type(err).__name__)
            return None
