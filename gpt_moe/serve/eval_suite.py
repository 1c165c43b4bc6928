"""The evaluation suite for any checkpoint, outside training: the figures a training run logs at each evaluation
(`gpt_moe.train.evaluator`), computed from the saved weights in one process with the same functions
(`gpt_moe.data.validation`, `gpt_moe.data.humaneval`), so a checkpoint's table repeats its run's record.

    data = run_validation_data(loaded) or validation_data("data/builtin")   # where the validation figures come from
    evaluation = suite_evaluation(loaded, data, problems=SUITE_PROBLEMS)      # Evaluation (its figures by name)

The validation figures are on the checkpoint's own run's validation batches when its run directory and data are
still there (the run's train_config.json: data, sequence length, micro-batch and evaluation batches, times the
ranks of its record: the windows every rank read), or on a directory given; `launch/eval.py --suite full` scores all
164 HumanEval problems and, for chat models, adds the generated chat figures (`gpt_moe.serve.chat_eval`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.checkpoint.records import RUN_CONFIG_FILE, read_record
from gpt_moe.data.bits_per_byte import token_byte_lengths
from gpt_moe.data.chat_batches import ChatValBatches
from gpt_moe.data.chat_template import end_of_turn_ids
from gpt_moe.data.humaneval import SUITE_PROBLEMS, canonical_bits_per_byte, suite_problems
from gpt_moe.data.manifest import MANIFEST_FILE
from gpt_moe.data.shards import TokenShards, ValBatches
from gpt_moe.data.validation import acceptance, mtp_counts, validation_totals
from gpt_moe.errors import DataError, GptMoeError

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (256, 16, 8)  # sequence length, micro-batch, batches: the training defaults, for data given alone


@dataclass(frozen=True)
class ValidationData:
    """The validation batches of a data directory as one process reads them."""

    shards: TokenShards
    seq_len: int
    micro_batch: int
    batches: int

    def read(self) -> ValBatches | ChatValBatches:
        kind = ChatValBatches if self.shards.content == "chat" else ValBatches
        return kind(self.shards, self.seq_len, self.micro_batch, self.batches)

    def describe(self) -> str:
        what = "conversations, their assistant tokens" if self.shards.content == "chat" else "text"
        return (f"{self.shards.directory} ({what}; the first {self.batches} validation batches of "
                f"{self.micro_batch} x {self.seq_len} tokens)")


def validation_data(directory: str | Path, seq_len: int | None = None, micro_batch: int | None = None,
                    batches: int | None = None) -> ValidationData:
    """A prepared data directory's validation batches (the training defaults' shape where not given); DataError
    when it is not prepared or has no validation split."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise DataError(f"{directory}: no prepared data ({MANIFEST_FILE} missing); prepare it with "
                        f"`python -m data_prep ... --out {directory}`")
    shards = TokenShards(directory)
    if not shards.has_split("val"):
        raise DataError(f"{directory}: no validation split (prepared with --val-fraction 0); prepare it again with "
                        "--val-fraction > 0")
    default = DEFAULT_SHAPE
    return ValidationData(shards, seq_len or default[0], micro_batch or default[1], batches or default[2])


def run_validation_data(loaded: LoadedModel) -> ValidationData | None:
    """The validation batches the checkpoint's run evaluated on (every rank's together), or None when the
    checkpoint is not in a run directory, or the run's data is gone or has no validation split."""
    run_dir = loaded.source.parent.parent
    try:
        config = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
        world = read_record(loaded.source).layout.world_size
        data = validation_data(Path(config["data"]), config["seq_len"], config["micro_batch"])
        per_rank = ValBatches if data.shards.content != "chat" else ChatValBatches
        batches = per_rank(data.shards, data.seq_len, data.micro_batch, config["eval_batches"], 0, world).n_batches
    except (OSError, ValueError, KeyError, TypeError, GptMoeError):
        return None
    return ValidationData(data.shards, data.seq_len, data.micro_batch, batches * world)


def check_tokenizer(data: ValidationData, loaded: LoadedModel) -> None:
    if data.shards.manifest.tokenizer.sha256 != loaded.tokenizer_info.sha256:
        raise DataError(f"{data.shards.directory}: tokenized with another tokenizer than {loaded.source}; give "
                        f"data prepared with --tokenizer-from {loaded.source}")


def suite_evaluation(loaded: LoadedModel, data: ValidationData | None, problems: int = SUITE_PROBLEMS,
                     progress: bool = False) -> Evaluation:
    """The validation figures on `data` (none without), the MTP draft acceptance, and HumanEval's first `problems`
    canonical solutions in bits per byte (none when the package is missing)."""
    model, tokenizer, figures = loaded.model, loaded.tokenizer, {}
    device = model.lm_head.weight.device
    if data is not None:
        check_tokenizer(data, loaded)
        ends = sorted(end_of_turn_ids(tokenizer)) if data.shards.content == "chat" else []
        totals = validation_totals(model, data.read(), device, token_byte_lengths(tokenizer, model.config.vocab_size),
                                   ends)
        figures.update(totals.figures())
        if model.config.num_nextn_predict_layers:
            share = acceptance(mtp_counts(model, data.read(), device))
            figures.update({"mtp_acceptance": share} if share is not None else {})
    chosen, why_not = suite_problems(tokenizer, problems)
    if chosen:
        bits = canonical_bits_per_byte(model, tokenizer, chosen, progress=progress)
        figures.update({"humaneval_bpb": bits.bits_per_byte, "humaneval_problems": float(bits.problems)})
    elif why_not:
        log.warning("%s: HumanEval left out: %s", loaded.source, why_not)
    return Evaluation(figures, loaded.training.step)
