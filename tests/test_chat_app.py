"""The chat page's request handler, facts, routing pictures and entry point, called in-process (no server)."""

import dataclasses

import gradio as gr
import pytest
import torch

from gpt_moe.checkpoint.evaluation import Evaluation
from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.serve.chat import RoutingRecord
from gpt_moe.serve.chat_app import ChatApp, Settings, conversation, main, model_facts
from gpt_moe.serve.routing_view import MAX_HEIGHT, load_chart, routing_heatmap, token_label


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    return ChatApp(load_for_inference(tiny_checkpoint), max_new_tokens=64)


def test_respond_streams_the_reply_then_draws_the_routing(app):
    history = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "reply"}]}]
    updates = list(app.respond("Hello <|assistant|>", history, temperature=1.0, max_new_tokens=20, seed=3))
    box, chat, *_ = updates[0]
    assert box == "" and chat[-2] == {"role": "user", "content": "Hello <|assistant|>"} and chat[-1]["content"] == ""
    texts = [u[1][-1]["content"] for u in updates[1:-1]]
    assert texts == sorted(texts, key=len) and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    _, chat, heatmap, load, summary = updates[-1]
    assert len(chat) == 4 and chat[-1]["role"] == "assistant"
    assert heatmap.width > 100 and heatmap.height > 100 and load.width > 100
    assert "tokens" in summary and "busiest experts" in summary
    for update in updates[1:-1]:  # pictures are drawn only every ROUTING_REFRESH_TOKENS tokens
        assert isinstance(update[2], type(gr.skip()))


def test_respond_bounds_inputs(app):
    with pytest.raises(gr.Error, match="limit is 4,000"):
        list(app.respond("x" * 4001, []))
    assert list(app.respond("   ", [])) == [("   ", [], gr.skip(), gr.skip(), gr.skip())]
    cfg = Settings(temperature=99, top_k=-5, top_p=0, max_new_tokens=10**9, seed=-1, repetition_penalty=float("nan")
                   ).sampling(max_new_tokens_limit=64)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.seed, cfg.repetition_penalty) == \
        (2.0, 0, 0.01, 64, None, Settings().repetition_penalty)
    long_history = [{"role": "user", "content": "hi"}] * 500
    assert len(conversation(long_history, "new", system_prompt="sys")) == 42  # system + newest 40 + message


def test_model_facts(app, training_facts):
    facts = dict(model_facts(app.loaded))
    assert facts["preset"] == "tiny"
    assert "activated per token" in facts["parameters"] and "16 routed (top-2" in facts["experts"]
    assert training_facts == {"step": 42, "tokens_seen": 172032, "val_loss": 5.4321, "chat": True}
    assert facts["training"] == "step 42, 172.03K tokens" and facts["validation loss"].startswith("5.432")
    assert facts["KV cache / token"].startswith(f"{3 * (32 + 8) * 2:,} B")  # 3 layers x (latent + rope key) x bf16
    assert facts["checkpoint"] == str(app.loaded.source)


def test_routing_pictures_for_large_models_stay_bounded():
    layers, experts, k = list(range(1, 27)), 64, 6
    record = RoutingRecord(layers, experts, k)
    for t in range(300):
        record.append(t, {layer: [(t * 7 + layer + i * 11) % experts for i in range(k)] for layer in layers})
    heatmap = routing_heatmap(record, [token_label(b"\xe2")] * len(record))
    assert 500 < heatmap.width <= 1200 and heatmap.height <= MAX_HEIGHT  # compact view: a row per choice
    assert load_chart(record).width >= experts * 3
    assert token_label(b" a\nb") == "·a\\nb" and token_label(b"\xe2\x82") == "\\xe2\\x82"
    empty = RoutingRecord([1, 2], 16, 2)
    assert routing_heatmap(empty, []).height > 0 and load_chart(empty).height > 0


def test_main_prints_one_line_without_a_checkpoint(tmp_path, capsys):
    assert main(["--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no complete checkpoint" in err and "deepspeed launch/train.py" in err


def test_a_base_model_continues_the_text_and_says_so(tiny_checkpoint):
    """A checkpoint not fine-tuned on conversations: no role markers around the message, one line at the top."""
    from gpt_moe.serve.chat_app import BASE_MODEL_NOTE, build_demo

    loaded = load_for_inference(tiny_checkpoint)
    loaded.training = dataclasses.replace(loaded.training, chat=False)
    base = ChatApp(loaded, max_new_tokens=8)
    assert dict(model_facts(loaded))["kind"].startswith("base")
    updates = list(base.respond("The quick brown", [], temperature=0.0, max_new_tokens=8, repetition_penalty=1.0))
    _, chat, *_ = updates[-1]
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"]
    greedy = loaded.model(torch.tensor([loaded.tokenizer.encode_ordinary("The quick brown")])).logits[0, -1]
    first = loaded.tokenizer.decode([int(greedy[: loaded.tokenizer.n_vocab].argmax())])
    assert chat[-1]["content"].startswith(first)  # a continuation of the text itself, no chat template
    assert BASE_MODEL_NOTE in str(build_demo(base).config)


def test_speculative_replies_are_plain_replies_with_the_same_routing_and_show_speed_and_acceptance(app):
    """Greedy: the speculative reply (the default where the model has an MTP block) has the plain reply's tokens
    and, token by token, the plain reply's routing; the summary shows tokens/s and the MTP draft acceptance."""
    replies = {}
    for speculative in (True, False):
        updates = list(app.respond("Hello", [], temperature=0.0, max_new_tokens=24, repetition_penalty=1.0,
                                   speculative=speculative))
        replies[speculative] = updates[-1]
    assert replies[True][1] == replies[False][1]
    assert "tokens/s" in replies[True][4] and "MTP draft acceptance" in replies[True][4]
    assert "plain decoding" in replies[False][4]
    from gpt_moe.serve.chat import generate_reply
    from gpt_moe.serve.generate import SamplingConfig

    streams = {}
    for draft_tokens in (0, 1, 3):  # 0: plain; 3: a step yields up to 4 tokens, each read at its own position
        cfg = SamplingConfig(max_new_tokens=24, temperature=0.0, speculative=draft_tokens > 0,
                             draft_tokens=max(draft_tokens, 1))
        streams[draft_tokens] = generate_reply(app.loaded.model, app.loaded.tokenizer, [{"role": "user",
                                                                                         "content": "Hi"}], cfg)
        list(streams[draft_tokens])
    for draft_tokens in (1, 3):
        assert streams[draft_tokens].token_ids == streams[0].token_ids
        assert streams[draft_tokens].routing.experts == streams[0].routing.experts
        assert streams[draft_tokens].stats.drafted > 0
    assert streams[0].stats.drafted == 0


def test_model_facts_show_the_mtp_acceptance(app, tiny_checkpoint):
    assert dict(model_facts(app.loaded))["MTP draft acceptance"].startswith("- (not measured")
    loaded = load_for_inference(tiny_checkpoint)
    evaluation = Evaluation({**loaded.training.evaluation.figures, "mtp_acceptance": 0.4567})
    loaded.training = dataclasses.replace(loaded.training, evaluation=evaluation)
    assert dict(model_facts(loaded))["MTP draft acceptance"].startswith("45.7% on validation data")


def test_a_model_without_mtp_block_decodes_plainly_and_says_so(tmp_path):
    from conftest import make_tiny_export

    loaded = load_for_inference(make_tiny_export(tmp_path / "no_mtp", num_nextn_predict_layers=0))
    plain = ChatApp(loaded, max_new_tokens=8)
    assert not plain.has_mtp and dict(model_facts(loaded))["MTP draft acceptance"].startswith("no MTP block")
    *_, summary = list(plain.respond("Hi", [], temperature=0.0, max_new_tokens=8, speculative=True))[-1]
    assert "plain decoding" in summary
