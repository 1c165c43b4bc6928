"""The Gradio chat page behind `python app.py`: streamed replies, sampling settings, model facts and
the routing view of the last reply (which experts each generated token went to, per MoE layer).

`ChatApp.respond` is the whole request handler as a plain generator (message, history, settings ->
updates of the textbox, chat, routing pictures and routing summary), so tests call it directly;
`build_demo` only lays out components and wires them to it; `main` is the command line.

Safety: binds 127.0.0.1 unless `--host`, no share link unless `--share`; messages, history and
every setting are bounded on the server (API clients bypass the page's limits); requests are
queued (bounded concurrency and queue size) and the model is shared under a lock taken once per
decode step, so concurrent users interleave instead of corrupting each other's routing records.
"""

from __future__ import annotations

import argparse
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from gpt_moe.checkpoint.loading import LoadedModel
from gpt_moe.checkpoint.records import RUNS_DIR
from gpt_moe.cli import run_cli
from gpt_moe.errors import GptMoeError
from gpt_moe.model.config import ModelConfig
from gpt_moe.model.params import account, human
from gpt_moe.serve.chat import ReplyStream, generate_continuation, generate_reply, load_chat_model
from gpt_moe.serve.generate import SamplingConfig
from gpt_moe.serve.routing_view import load_chart, routing_heatmap, token_label

BASE_MODEL_NOTE = ("**This is a base model** (not fine-tuned on conversations): each message is continued as "
                   "text, without chat roles. Fine-tune it with `--init-from` to chat.")
CHAT_REPETITION_PENALTY = 1.1
"""The page's one sampling default of its own (the library's is 1.0, no penalty): the small models people chat with
here fall into loops without it."""
MAX_MESSAGE_CHARS = 4000
MAX_NEW_TOKENS = 512
MAX_HISTORY_MESSAGES = 40  # older turns would not fit a small model's context anyway
ROUTING_REFRESH_TOKENS = 48  # redraw the routing view this often while a reply streams
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto;}
#facts table {font-size: 0.9em;}
#routing-summary {min-height: 2.5em;}
#chat [data-testid="bot"] {white-space: pre-wrap;}  /* a language model's spaces and newlines are its output */
"""


# ------------------------------------------------------------------------------------------ facts


def model_facts(loaded: LoadedModel) -> list[tuple[str, str]]:
    """(label, value) rows of the facts panel: preset, parameters, training, cache, checkpoint."""
    config, training = loaded.model.config, loaded.training
    a = account(config)
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    tokens = training.tokens_seen
    groups = f", {config.n_group} groups" if config.n_group > 1 else ""
    return [
        ("preset", config.name),
        ("parameters", f"{human(a.total_params)} total, {human(a.active_params)} activated per token"),
        ("experts", f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}{groups}) + "
                    f"{config.n_shared_experts} shared; {n_moe} of {config.num_hidden_layers} layers MoE"),
        ("training", f"step {training.step if training.step is not None else '?'}, "
                     f"{human(tokens) if tokens is not None else '?'} tokens"),
        ("validation loss", f"{training.val_loss:.3f} (perplexity {math.exp(min(training.val_loss, 50)):.1f}"
                            f"{training.bpb_text})"
         if training.has_val_loss else "-"),
        ("MTP draft acceptance", mtp_fact(config, training.mtp_acceptance)),
        ("KV cache / token", f"{a.kv_cache_bytes_per_token:,} B (MLA latent, bf16); "
                             f"per-head K/V would be {a.mha_kv_cache_bytes_per_token:,} B"),
        ("context", f"{config.max_position_embeddings} tokens"),
        ("tokenizer", f"{loaded.tokenizer_info.name} ({loaded.tokenizer_info.n_vocab} tokens)"),
        ("kind", "chat (fine-tuned on conversations)" if training.chat else "base (continues text)"),
        ("checkpoint", str(loaded.source)),
    ]


def mtp_fact(config: ModelConfig, acceptance: Any) -> str:
    """The facts row of the MTP block: its validation acceptance (teacher-forced) when the checkpoint has one."""
    if not config.num_nextn_predict_layers:
        return "no MTP block (plain decoding only)"
    if isinstance(acceptance, (int, float)) and math.isfinite(acceptance):
        return f"{acceptance:.1%} on validation data (teacher-forced top-1 agreement)"
    return "- (not measured for this checkpoint)"


def facts_markdown(loaded: LoadedModel) -> str:
    rows = "\n".join(f"| {label} | {value.replace('|', '/')} |" for label, value in model_facts(loaded))
    return f"| model | |\n| --- | --- |\n{rows}\n"


# --------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """The page's sampling settings, clamped to safe ranges on the server; defaults from `SamplingConfig`."""

    temperature: float = SamplingConfig.temperature
    top_k: int = SamplingConfig.top_k
    top_p: float = SamplingConfig.top_p
    max_new_tokens: int = SamplingConfig.max_new_tokens
    seed: int = -1  # < 0: a fresh random seed per reply
    repetition_penalty: float = CHAT_REPETITION_PENALTY
    system_prompt: str = ""
    speculative: bool = True  # the model's MTP block drafts; used only where the model has one

    def sampling(self, max_new_tokens_limit: int = MAX_NEW_TOKENS) -> SamplingConfig:
        def clamp(value: Any, low: float, high: float, kind: type, default: float) -> Any:
            try:
                number = kind(value)
            except (TypeError, ValueError):
                return kind(default)
            return kind(min(max(number, low), high)) if math.isfinite(number) else kind(default)

        defaults = Settings()
        seed = clamp(self.seed, -1, 2**63 - 1, int, -1)
        return SamplingConfig(max_new_tokens=clamp(self.max_new_tokens, 1, max_new_tokens_limit, int,
                                                   min(defaults.max_new_tokens, max_new_tokens_limit)),
                              temperature=clamp(self.temperature, 0.0, 2.0, float, defaults.temperature),
                              top_k=clamp(self.top_k, 0, 1000, int, defaults.top_k),
                              top_p=clamp(self.top_p, 0.01, 1.0, float, defaults.top_p),
                              repetition_penalty=clamp(self.repetition_penalty, 1.0, 2.0, float,
                                                       defaults.repetition_penalty),
                              seed=seed if seed >= 0 else None, speculative=self.speculative is True)


def message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or Gradio's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def conversation(history: Sequence[dict[str, Any]], message: str, system_prompt: str = "") -> list[dict[str, str]]:
    """Template messages from the page's history (newest MAX_HISTORY_MESSAGES, text only) + the new message."""
    turns = [{"role": m.get("role"), "content": message_text(m.get("content"))[-4 * MAX_MESSAGE_CHARS:]}
             for m in list(history or [])[-MAX_HISTORY_MESSAGES:] if isinstance(m, dict)]
    turns = [t for t in turns if t["role"] in ("user", "assistant") and t["content"]]
    system = [{"role": "system", "content": system_prompt[:MAX_MESSAGE_CHARS]}] if system_prompt.strip() else []
    return [*system, *turns, {"role": "user", "content": message}]


# -------------------------------------------------------------------------------------------- app


class ChatApp:
    """One loaded model served to many requests. `respond` is the request handler."""

    def __init__(self, loaded: LoadedModel, max_new_tokens: int = MAX_NEW_TOKENS,
                 max_message_chars: int = MAX_MESSAGE_CHARS, chat: bool | None = None) -> None:
        self.loaded = loaded
        self.max_new_tokens = min(max_new_tokens, loaded.model.config.max_position_embeddings // 2)
        self.max_message_chars = max_message_chars
        self.lock = threading.Lock()
        # a base model continues the typed text instead; `chat` overrides (a published model's directory says neither)
        self.chat = loaded.training.chat if chat is None else chat
        self.has_mtp = loaded.model.model.mtp_layer is not None  # speculative decoding needs the MTP block

    def respond(self, message: str, history: list[dict[str, Any]] | None, temperature: float = Settings.temperature,
                top_k: int = Settings.top_k, top_p: float = Settings.top_p,
                max_new_tokens: int = Settings.max_new_tokens, seed: int = Settings.seed,
                repetition_penalty: float = Settings.repetition_penalty, system_prompt: str = "",
                speculative: bool = Settings.speculative) -> Iterator[tuple]:
        """Yields (textbox value, chat history, routing heatmap, load chart, routing summary) updates:
        first the user's turn with an empty reply, then the reply as it grows, then the routing view.
        Outputs that did not change are `gr.skip()`."""
        message = message if isinstance(message, str) else ""
        history = [dict(m) for m in history or [] if isinstance(m, dict)]
        if not message.strip():
            yield message, history, gr.skip(), gr.skip(), gr.skip()
            return
        if len(message) > self.max_message_chars:
            raise gr.Error(f"The message has {len(message):,} characters; the limit is {self.max_message_chars:,}.")
        settings = Settings(temperature, top_k, top_p, max_new_tokens, seed, repetition_penalty,
                            system_prompt if isinstance(system_prompt, str) else "", speculative and self.has_mtp)
        sampling = settings.sampling(self.max_new_tokens)
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        try:
            if self.chat:
                messages = conversation(history, message, settings.system_prompt)
                reply = generate_reply(model, tokenizer, messages, sampling, lock=self.lock)
            else:
                reply = generate_continuation(model, tokenizer, message, sampling, lock=self.lock)
        except GptMoeError as err:
            raise gr.Error(str(err)) from None
        asked = [*history, {"role": "user", "content": message}]

        def chat(text: str) -> list[dict[str, Any]]:  # a new list per update: earlier updates stay as they were
            return [*asked, {"role": "assistant", "content": text}]

        yield "", chat(""), gr.skip(), gr.skip(), "*generating...*"
        for _ in reply:
            if len(reply.routing) % ROUTING_REFRESH_TOKENS == 0:
                yield "", chat(reply.text), *self.routing_view(reply)
            else:
                yield "", chat(reply.text), gr.skip(), gr.skip(), gr.skip()
        yield "", chat(reply.text or "(empty reply)"), *self.routing_view(reply)

    def routing_view(self, reply: ReplyStream) -> tuple[Any, Any, str]:
        """(heatmap image, load chart image, markdown summary) of a reply so far."""
        record, tokenizer = reply.routing, self.loaded.tokenizer
        if not record.layers:
            return None, None, "This model has no MoE layers: every token uses the same dense feed-forward."
        labels = [token_label(tokenizer.decode_single_token_bytes(t)) if t < tokenizer.n_vocab else "?"
                  for t in record.token_ids]
        stopped = reply.finish_reason == "stop"
        return routing_heatmap(record, labels, stopped=stopped), load_chart(record), routing_summary(reply)


def routing_summary(reply: ReplyStream) -> str:
    """One markdown line: tokens, how the reply ended, busiest and unused experts, imbalance."""
    record = reply.routing
    n = len(record)
    if n == 0:
        return "No tokens were generated."
    load = record.load()
    total = sum(load)
    order = sorted(range(record.n_experts), key=lambda e: -load[e])
    busiest = ", ".join(f"e{e} {100 * load[e] / total:.0f}%" for e in order[:3] if load[e])
    unused = [f"e{e}" for e in range(record.n_experts) if load[e] == 0]
    ended = {"stop": "ended at an end marker", "length": "stopped at the token limit"}.get(
        reply.finish_reason or "", "still generating")
    dropped = reply.prompt.dropped_messages
    parts = [f"**{n} tokens** ({ended})", f"busiest experts: {busiest}",
             f"unused: {', '.join(unused[:8])}{'...' if len(unused) > 8 else ''}" if unused else "every expert used",
             f"max/mean load {max(load) / (total / record.n_experts):.2f}"]
    if dropped:
        parts.append(f"{dropped} oldest message{'s' * (dropped != 1)} left out to fit the context")
    if reply.prompt.truncated:
        parts.append("the message was cut to fit the context")
    return " · ".join(parts) + "\n\n" + speed_summary(reply)


def speed_summary(reply: ReplyStream) -> str:
    """One markdown line: tokens/s of the reply (prefill included) and, when speculative, the MTP draft acceptance
    and the tokens each main forward yielded."""
    rate = reply.tokens_per_second
    speed = f"**{rate:.1f} tokens/s**" if rate is not None else "**- tokens/s**"
    if not reply.sampling.speculative:
        return f"{speed} · plain decoding (one token per forward)"
    return f"{speed} · speculative decoding: {reply.stats.draft_summary()}"


# ------------------------------------------------------------------------------------------- page


def sampling_controls(app: ChatApp, defaults: Settings) -> list:
    """The settings' components, in the order of `ChatApp.respond`'s arguments after message and history."""
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                label="temperature", info="0 = greedy", elem_id="temperature")
        top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top-k", info="0 = off",
                          elem_id="top-k")
    with gr.Row():
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="top-p", info="1 = off",
                          elem_id="top-p")
        max_new = gr.Slider(1, app.max_new_tokens, step=1, label="max new tokens",
                            value=min(defaults.max_new_tokens, app.max_new_tokens),
                            elem_id="max-new-tokens")
    with gr.Row():
        penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05,
                            label="repetition penalty", elem_id="repetition-penalty")
        seed = gr.Number(value=defaults.seed, precision=0, label="seed", info="-1 = random",
                         elem_id="seed")
    system = gr.Textbox(label="system prompt", lines=1, max_length=app.max_message_chars,
                        placeholder="(optional)", elem_id="system-prompt")
    speculative = gr.Checkbox(value=app.has_mtp, interactive=app.has_mtp, elem_id="speculative",
                              label="speculative decoding (the MTP block drafts)",
                              info="same output distribution, fewer forwards" if app.has_mtp
                              else "this model has no MTP block")
    return [temperature, top_k, top_p, max_new, seed, penalty, system, speculative]


def build_demo(app: ChatApp) -> gr.Blocks:
    """The page: chat and controls on the left, settings and facts on the right, routing view below."""
    config = app.loaded.model.config
    defaults = Settings()
    with gr.Blocks(title=f"gpt-moe chat: {config.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"## gpt-moe chat: `{config.name}`\nA DeepSeek-style mixture-of-experts model. "
                    "Below the chat: which experts the router chose for every token of the last reply.")
        if not app.chat:
            gr.Markdown(BASE_MODEL_NOTE, elem_id="base-model-note")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="chat", height=470, elem_id="chat", buttons=["copy"],
                                  feedback_options=None, placeholder="Say something to the model.",
                                  render_markdown=False)
                with gr.Row():
                    box = gr.Textbox(placeholder=f"Message (up to {app.max_message_chars:,} characters)",
                                     max_length=app.max_message_chars, show_label=False, lines=1, scale=6,
                                     elem_id="message", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send", min_width=80)
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop", min_width=80)
                    clear = gr.Button("Clear", scale=1, elem_id="clear", min_width=80)
            with gr.Column(scale=2):
                with gr.Accordion("Sampling", open=True):
                    settings = sampling_controls(app, defaults)
                with gr.Accordion("Model", open=True):
                    gr.Markdown(facts_markdown(app.loaded), elem_id="facts")
        gr.Markdown("### Routing and speed of the last reply")
        summary = gr.Markdown("Send a message to see which experts its reply used.", elem_id="routing-summary")
        with gr.Row():
            heatmap = gr.Image(label="experts per token and layer", show_label=False, type="pil", format="png",
                               interactive=False, elem_id="routing-heatmap", scale=3,
                               buttons=["download", "fullscreen"])
            load = gr.Image(label="expert load of the reply", show_label=False, type="pil", format="png",
                            interactive=False, elem_id="routing-load", scale=2, buttons=["download"])

        inputs = [box, chat, *settings]
        outputs = [box, chat, heatmap, load, summary]
        on_send = send.click(app.respond, inputs, outputs, api_name="chat")
        on_enter = box.submit(app.respond, inputs, outputs, api_name=False)
        stop.click(None, cancels=[on_send, on_enter])
        clear.click(lambda: ([], None, None, "Send a message to see which experts its reply used."), None,
                    [chat, heatmap, load, summary], cancels=[on_send, on_enter], queue=False, api_name=False)
    return demo


# ------------------------------------------------------------------------------------ entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="Chat with a gpt-moe checkpoint in the browser.")
    parser.add_argument("--checkpoint", help="run directory, checkpoints/step_* directory, exported directory or a "
                                             "transformers model directory with its tokenizer "
                                             "(default: the newest complete checkpoint under --runs-dir)")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="reply through the chat template (the model's own for a published model); --no-chat: "
                             "continue the text; default: chat for a model fine-tuned on conversations")
    parser.add_argument("--runs-dir", default=RUNS_DIR, help=f"where to look for checkpoints (default: {RUNS_DIR})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=int, default=2, help="replies generated at once (default 2)")
    parser.add_argument("--queue-size", type=int, default=32, help="requests waiting at most (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"upper bound of the page's max-new-tokens setting (default {MAX_NEW_TOKENS})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: serve(parse_args(argv)))


def serve(args: argparse.Namespace) -> None:
    loaded = load_chat_model(args.checkpoint, args.runs_dir)
    app = ChatApp(loaded, max_new_tokens=max(1, args.max_new_tokens), chat=args.chat)
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=max(1, args.concurrency), max_size=max(1, args.queue_size))
    print(f"serving {loaded.source} ({loaded.model.config.name}) on http://{args.host}:{args.port}", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                    theme=gr.themes.Soft(), css=CSS, footer_links=["api"])
    except OSError as err:  # port taken, address not available
        raise GptMoeError(f"cannot serve on {args.host}:{args.port}: {err}") from None
