"""Evaluation inside a training run: validation loss and bits per byte, the MTP block's draft acceptance, and a
text sample.

Every rank calls each of these together: the experts and ZeRO-3's parameter shards live on several ranks, so the
model only runs with all of them. Nothing here changes the model or the data position.

    evaluator = Evaluator(engine, val_batches, chat, tokenizer, context, sample_tokens)
    result = evaluator.evaluate()      # Evaluation(val_loss, val_bpb, mtp_acceptance, sample)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt_moe.data.bits_per_byte import bits_per_byte, nats_and_bytes, token_byte_lengths
from gpt_moe.data.chat_batches import ChatValBatches, PackedBatch
from gpt_moe.data.chat_template import continuation_prompt, format_chat
from gpt_moe.data.shards import ValBatches
from gpt_moe.model.loss import IGNORE_INDEX
from gpt_moe.model.mtp_acceptance import mtp_agreement
from gpt_moe.train.engine import Distributed

SAMPLE_QUESTION = "What does the function len do?"  # asked at each evaluation of a chat fine-tuning run
SAMPLE_PROMPT = "def "  # continued at each evaluation of a pretraining run


def model_inputs(batch: tuple[torch.Tensor, torch.Tensor] | PackedBatch, device: torch.device) -> dict:
    """The model's keyword arguments for a batch: (inputs, labels) windows of text, or packed conversations."""
    if isinstance(batch, PackedBatch):
        return batch.to(device).model_inputs()
    inputs, labels = batch
    return {"input_ids": inputs.to(device), "labels": labels.to(device)}


@torch.no_grad()
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
class Evaluation:
    val_loss: float | None  # None without a validation split (NaN: no token counted)
    val_bpb: float | None  # bits per byte of the same tokens (`gpt_moe.data.bits_per_byte`), None as val_loss
    mtp_acceptance: float | None  # None without an MTP block or without a validation split
    sample: str | None  # None when --sample-tokens is 0


class Evaluator:
    """The evaluations of one run. `val_batches` is None for data without a validation split."""

    def __init__(self, engine, val_batches: ValBatches | ChatValBatches | None, chat: bool, tokenizer,
                 context: Distributed, sample_tokens: int) -> None:
        self.engine, self.val_batches, self.chat = engine, val_batches, chat
        self.tokenizer, self.context, self.sample_tokens = tokenizer, context, sample_tokens
        self.device = context.device
        self.byte_lengths = token_byte_lengths(tokenizer, engine.module.config.vocab_size).to(self.device)

    def evaluate(self) -> Evaluation:
        val_loss, val_bpb, acceptance = None, None, None
        if self.val_batches is not None:
            (val_loss, val_bpb), acceptance = self.validation_loss(), self.mtp_acceptance()
        return Evaluation(val_loss, val_bpb, acceptance, self.sample_text() if self.sample_tokens else None)

    @torch.no_grad()
    def validation_loss(self) -> tuple[float, float]:
        """(validation LM loss: the mean over every target token, for chat data every trained token; bits per byte
        of the text tokens among them), over all ranks."""
        self.engine.eval()
        total = torch.zeros(4, dtype=torch.float64)  # nats, tokens; nats of text tokens, their bytes
        for batch in self.val_batches:
            inputs = model_inputs(batch, self.device)
            nats, labels = self.engine(**inputs, per_token_nats=True).token_nats, inputs["labels"]
            counted = torch.stack([nats.double().sum(), (labels != IGNORE_INDEX).sum().double()]).cpu()
            total += torch.cat([counted, nats_and_bytes(nats, labels, self.byte_lengths)])
        self.engine.train()
        total = self.context.all_reduce(total).cpu()
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan"), bits_per_byte(total[2:])

    @torch.no_grad()
    def mtp_acceptance(self) -> float | None:
        """Teacher-forced share of validation positions where the MTP block's top token for the token after next
        is the main model's (`gpt_moe.model.mtp_acceptance`); None without an MTP block or counted positions."""
        if not self.engine.module.config.num_nextn_predict_layers:
            return None
        self.engine.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for batch in self.val_batches:
            counts += mtp_agreement(self.engine.module, **model_inputs(batch, self.device)).cpu().double()
        self.engine.train()
        counts = self.context.all_reduce(counts).cpu()
        return (counts[0] / counts[1]).item() if counts[1] > 0 else None

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
        self.engine.eval()
        ids = greedy_uncached(self.engine.module, torch.tensor([prompt], device=self.device), self.sample_tokens,
                              vocab_limit=tokenizer.n_vocab)
        self.engine.train()
        text = tokenizer.decode(ids[0, shown:].tolist())
        return f"{SAMPLE_QUESTION} -> {text}" if self.chat else text
