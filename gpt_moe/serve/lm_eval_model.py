"""The lm-evaluation-harness backend `gpt-moe`: lm-eval's tasks run on any model this project loads (a run, a
checkpoint tag of any ZeRO stage and expert-parallel size, a layout-free checkpoint, an export, a transformers
directory with its tokenizer), without exporting it first.

    python launch/lm_eval_harness.py --model gpt-moe --model_args checkpoint=runs/tiny --tasks TASKS

Importing this module registers the backend in lm-eval's model registry (lm-eval 0.4 has no plugin discovery, so
`launch/lm_eval_harness.py` imports it and then runs lm-eval's own command line). model_args: `checkpoint` (required),
`batch_size`, `max_length` (the context; default the model's `max_position_embeddings`), `max_gen_toks` (256),
`device` (cuda where available, else cpu), `dtype` (float32 | bfloat16; "auto": float32).

It scores as lm-eval's `hf` backend does on the export of the same weights, so the two agree (the test holds them
within 1e-4 nats per item): a context and continuation are encoded whole and split where the context's own encoding
ends (`TemplateLM._encode_pair`); an empty context is the BOS (else EOS) token; rows sorted longest first and padded
on the right, one forward per batch; rolling log-likelihoods over disjoint windows of `max_length` tokens.
Text is encoded as transformers encodes it: special tokens spelled in the text are parsed (a chat-templated prompt
holds the markers as text) and a published model's BOS comes first unless the text starts with it.

Generation is the project's latent-cache decoder (`gpt_moe.serve.generate.generate_ids`, left-padded batches):
greedy unless `do_sample`, then temperature, top_k, top_p (and repetition_penalty, seed), over all the model's
output rows as the `hf` backend does (rows beyond the tokenizer's ids, where a model has more, decode to nothing);
it stops at the EOS token (for prompts lm-eval rendered through the chat template, at the end of the model's turn)
or at the first `until` string, whose text is cut off; special tokens are left out of the text. The chat template
is the model's own (`gpt_moe.data.chat_template`: ours, or a published model's), applied when lm-eval is given
`--apply_chat_template`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own backends registered first: its registry imports them only when empty
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from gpt_moe.checkpoint.export import DTYPES
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.data.chat_template import JINJA_TEMPLATE, end_of_text_id, format_chat, model_template, reply_stop_ids
from gpt_moe.data.published_tokenizer import PublishedTokenizer
from gpt_moe.errors import ConfigError
from gpt_moe.serve.generate import SamplingConfig, TextStream, generate_ids

log = logging.getLogger(__name__)

SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"}
"""lm-eval generation kwargs this backend follows, besides `until` and `max_gen_toks`; any other is refused."""
CONTINUE_TAG = "\x00gpt-moe-continue\x00"
"""Appended to the final message to find where it ends in the rendered chat (transformers' continue_final_message)."""
Scored = tuple[float, bool]


@register_model("gpt-moe")
class GptMoeLM(TemplateLM):
    """A loaded gpt-moe model as an lm-eval `TemplateLM` (one process; lm-eval's data parallelism is not used)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = 1, max_length: int | None = None,
                 max_gen_toks: int = 256, device: str | None = None, dtype: str = "float32",
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown or checkpoint is None:
            raise ConfigError(f"lm-eval --model gpt-moe: model_args {', '.join(sorted(unknown)) or '(no checkpoint)'}:"
                              " expected checkpoint=PATH and optionally batch_size, max_length, max_gen_toks, device, "
                              "dtype")
        self._batch_size = _positive("batch_size", 1 if batch_size is None else batch_size)
        torch_dtype = _dtype(dtype)
        self._device = _device(device)
        self.loaded = load_for_inference(checkpoint, self._device, torch_dtype)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        context = self.model.config.max_position_embeddings
        self._max_length = _positive("max_length", max_length if max_length is not None else context)
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        special = self.tokenizer.special_tokens_set
        self.special_ids = {self.tokenizer.encode_single_token(token) for token in special}
        published = isinstance(self.tokenizer, PublishedTokenizer)
        self.bos = self.tokenizer.bos if published else None
        self.document_prefix = list(self.tokenizer.document_prefix) if published else []
        self.chat_applied = False  # lm-eval rendered prompts through `apply_chat_template`
        log.info("gpt-moe: %s (%s, %s on %s, max_length %d)", self.loaded.source, self.model.config.name, torch_dtype,
                 self._device, self._max_length)

    # ------------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return end_of_text_id(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context: the BOS token, else the EOS token (as the `hf` backend)."""
        return self.bos if self.bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        info = self.loaded.tokenizer_info
        return f"{info.name}-{info.sha256[:16]}".replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Jinja form of the model's chat template (for lm-eval's records); None when not asked for."""
        if not chat_template:
            return None
        template = model_template(self.tokenizer)
        return template.text if template is not None else JINJA_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as text through the model's template; without a generation prompt the final
        (assistant) message stays open, to be continued (transformers' `continue_final_message`)."""
        self.chat_applied = True
        if not self.loaded.training.chat:
            log.warning("gpt-moe: %s was not fine-tuned on conversations; its chat markers are untrained",
                        self.loaded.source)
        messages = [dict(message) for message in chat_history]
        if not add_generation_prompt and messages:
            messages[-1]["content"] = messages[-1].get("content", "") + CONTINUE_TAG
        template = model_template(self.tokenizer)
        text = template.render_text(messages, add_generation_prompt)[0] if template is not None else \
            self.tokenizer.decode(format_chat(self.tokenizer, messages, add_generation_prompt))
        return text[:text.rindex(CONTINUE_TAG)] if CONTINUE_TAG in text else text

    # ------------------------------------------------------------------ text <-> ids
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids as transformers' tokenizer of the export gives them: special tokens spelled in `string` parsed, the
        document prefix (a published model's BOS) first unless `add_special_tokens` is False or, left unsaid, the
        text already starts with it."""
        if isinstance(self.tokenizer, PublishedTokenizer):
            ids = self.tokenizer.encode_with_special(string)
        else:
            ids = self.tokenizer.encode(string, allowed_special="all")
        prefix = self.document_prefix
        if add_special_tokens is False or (add_special_tokens is None and ids[:len(prefix)] == prefix):
            return ids
        return prefix + ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` without the special tokens (transformers' skip_special_tokens)."""
        return self.tokenizer.decode([t for t in tokens if t not in self.special_ids and t < self.tokenizer.n_vocab])

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[Scored]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request of
        (key, context ids, continuation ids); requests sharing context + continuation[:-1] share one row."""
        order = Collator(requests, sort_fn=_longest_first, group_by="contexts", group_fn=_shared_prefix)
        results: list[Scored] = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="gpt-moe loglikelihood") as progress:
            for chunk in order.get_batched(n=self.batch_size):
                for (key, context, continuation), (logprobs, greedy) in zip(chunk, self._score_rows(chunk)):
                    # requests sharing this row (one-token continuations of one context): lm-eval's Collator
                    # hands back each one's key and continuation
                    for key, continuation, row in order.get_cache(req_str=key, cxt_toks=context,
                                                                  cont_toks=continuation, logits=logprobs[None]):
                        answer = _gathered(row[0], greedy, continuation)
                        results.append(answer)
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                        progress.update(1)
        return order.get_original(results)

    @torch.no_grad()
    def _score_rows(self, chunk: list[tuple[Any, list[int], list[int]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per request: (fp32 log-probabilities [len(continuation), vocab] at the positions predicting the
        continuation, the argmax ids [len(continuation)] there). Rows: context + continuation without its last token,
        at most `max_length` tokens kept from the right, padded on the right; one forward for the chunk."""
        rows = []
        for key, context, continuation in chunk:
            if not continuation:
                raise ConfigError(f"lm-eval request {key!r}: the continuation encodes to no tokens; every choice and "
                                  "target needs some text")
            rows.append((context + continuation)[-(self.max_length + 1):][:-1])
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        logits = self.model(ids.to(self.device)).logits  # [batch, longest, vocab]
        out = []
        for i, (row, (_, _, continuation)) in enumerate(zip(rows, chunk)):
            picked = torch.log_softmax(logits[i, len(row) - len(continuation):len(row)].float(), dim=-1)
            out.append((picked, picked.argmax(dim=-1)))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: disjoint windows of at most `max_length` predicted tokens, each
        with as much preceding text as fits, the first after the prefix token (lm-eval's rolling windows)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Each request's (context, gen_kwargs) continued; batches of one gen_kwargs, longest contexts first."""
        order = Collator([request.args for request in requests], sort_fn=lambda req: (-len(self.tok_encode(req[0])),
                                                                                      req[0]),
                         group_by="gen_kwargs", group_fn=lambda req: req[1])
        results: list[str] = []
        with tqdm(total=len(requests), disable=disable_tqdm, desc="gpt-moe generate_until") as progress:
            for chunk in order.get_batched(n=self.batch_size):
                contexts, all_kwargs = zip(*chunk)
                sampling, until = self._sampling(all_kwargs[0])
                for context, text in zip(contexts, self._generate(list(contexts), sampling, until)):
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                    progress.update(1)
        return order.get_original(results)

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
        """lm-eval's generation kwargs as our `SamplingConfig` and the stop strings; ConfigError for any we do not
        follow (rather than a silently different decoding)."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        max_new = kwargs.pop("max_gen_toks")
        unknown = set(kwargs) - SAMPLING_KEYS
        if unknown:
            raise ConfigError(f"lm-eval generation kwargs {', '.join(sorted(unknown))}: the gpt-moe backend follows "
                              f"until, max_gen_toks and {', '.join(sorted(SAMPLING_KEYS))}")
        if not 1 <= max_new < self.max_length:
            raise ConfigError(f"max_gen_toks {max_new}: expected 1 .. {self.max_length - 1} (max_length "
                              f"{self.max_length})")
        sample = bool(kwargs.get("do_sample"))
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=float(kwargs["temperature"]) if sample else 0.0,
                                  top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                  repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
                                  seed=None if kwargs.get("seed") is None else int(kwargs["seed"]))
        # no vocab_limit: over all the model's rows, as the `hf` backend
        return sampling, until

    def _generate(self, contexts: list[str], sampling: SamplingConfig, until: list[str]) -> list[str]:
        """The continuations of a batch (left-padded in `generate_ids`): each row ends at a stop token or at its
        first `until` string; the batch ends when every row has."""
        keep = self.max_length - sampling.max_new_tokens
        prompts = [self.tok_encode(context)[-keep:] or [self.prefix_token_id] for context in contexts]
        stop_ids = reply_stop_ids(self.tokenizer) if self.chat_applied else {self.eot_token_id}
        streams = [TextStream(self.tokenizer) for _ in prompts]
        texts, done = [""] * len(prompts), [False] * len(prompts)
        steps = generate_ids(self.model, prompts, sampling, stop_ids)
        try:
            for next_ids in steps:
                for row, token in enumerate(next_ids.tolist()):
                    if done[row]:
                        continue
                    if token in stop_ids:
                        done[row] = True
                    elif token not in self.special_ids:
                        texts[row] += streams[row].push(token)
                        done[row] = any(stop in texts[row] for stop in until if stop)
                if all(done):
                    break
        finally:
            steps.close()
        return [postprocess_generated_text(text + stream.flush(), until, None) for text, stream in zip(texts, streams)]


def _longest_first(request: tuple[Any, list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
    tokens = request[1] + request[2]
    return -len(tokens), tuple(tokens)


def _shared_prefix(request: tuple[Any, list[int], list[int]]) -> list[int]:
    """Requests with the same context + continuation[:-1] read their log-probabilities off the same row."""
    return request[1] + request[2][:-1]


def _gathered(logprobs: torch.Tensor, greedy: torch.Tensor, continuation: list[int]) -> Scored:
    """logprobs: [>= n, vocab], greedy: [>= n] at the positions predicting the last n = len(continuation) tokens."""
    n = len(continuation)
    target = torch.tensor(continuation, device=logprobs.device)
    picked = logprobs[-n:].gather(1, target[:, None]).squeeze(1)
    return float(picked.sum()), bool((greedy[-n:] == target).all())


def _positive(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"lm-eval --model gpt-moe: {name}={value}: expected a positive integer")
    return number


def _device(name: str | None) -> torch.device:
    """`name`, or where it is left unsaid or names a GPU this machine lacks (lm-eval's command line says cuda:0
    unless told otherwise), the GPU when there is one, else the CPU (as the `hf` backend)."""
    if name and not (name.startswith("cuda") and not torch.cuda.is_available()):
        return torch.device(name)
    if name:
        log.warning("gpt-moe: device %s: no CUDA device here, using the CPU", name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"lm-eval --model gpt-moe: dtype={name}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
