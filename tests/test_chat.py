"""Chat template, prompt fitting, and replies with their routing record (against a full forward pass)."""

import copy
import shutil

import pytest
import torch

from gpt_moe.checkpoint.loading import load_for_inference
from gpt_moe.data.chat_template import (JINJA_TEMPLATE, ChatPrompt, fit_chat, format_chat, render_conversation,
                                        reply_stop_ids, special_id)
from gpt_moe.data.tokenizer import ASSISTANT, END, ENDOFTEXT, SYSTEM, USER
from gpt_moe.errors import CheckpointError, DataError
from gpt_moe.serve.chat import ReplyStream, generate_reply, load_chat_model, recording_routing
from gpt_moe.serve.generate import SamplingConfig

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say <|user|> and <|end|> please"}]


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_for_inference(tiny_checkpoint)


def test_template_uses_special_ids_and_keeps_marker_text_plain(loaded):
    tok = loaded.tokenizer
    ids = format_chat(tok, CONVERSATION)
    system, user, assistant, end = (special_id(tok, t) for t in (SYSTEM, USER, ASSISTANT, END))
    system_text, user_text = (tok.encode_ordinary(m["content"]) for m in CONVERSATION)
    assert ids == [system, *system_text, end, user, *user_text, end, assistant]
    assert ids.count(user) == 1 and ids.count(end) == 2  # the markers typed by the user stay text
    assert tok.decode(ids) == ("<|system|>You are terse.<|end|><|user|>Say <|user|> and <|end|> please"
                               "<|end|><|assistant|>")
    assert format_chat(tok, CONVERSATION, add_generation_prompt=False) == ids[:-1]
    assert reply_stop_ids(tok) >= {end, special_id(tok, ENDOFTEXT)}
    with pytest.raises(DataError, match="role 'tool'"):
        format_chat(tok, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_jinja_template_renders_what_format_chat_encodes_and_marks_what_is_trained(loaded, generation_prompt):
    """The template exported for transformers (Jinja, rendered by transformers) and ours (Python) give the same
    conversation text, and its {% generation %} spans are exactly the text render_conversation trains on."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = loaded.tokenizer
    conversation = [*CONVERSATION, {"role": "assistant", "content": "Ok: <|end|>\n"}, {"role": "user", "content": ""}]
    rendered, spans = render_jinja_template([conversation], chat_template=JINJA_TEMPLATE,
                                            add_generation_prompt=generation_prompt, return_assistant_tokens_mask=True)
    assert rendered[0] == tok.decode(format_chat(tok, conversation, add_generation_prompt=generation_prompt))
    ids, mask = render_conversation(tok, conversation)
    trained = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert "".join(rendered[0][start:end] for start, end in spans[0]) == trained == "Ok: <|end|>\n<|end|>"


def test_fit_chat_drops_oldest_turns_then_cuts_the_last_one(loaded):
    tok = loaded.tokenizer
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn number {i} " * 5} for i in range(6)]
    messages = [{"role": "system", "content": "sys"}, *turns]
    whole = format_chat(tok, messages)
    assert fit_chat(tok, messages, len(whole)) == ChatPrompt(whole, 0, False)
    newest_two = format_chat(tok, [messages[0], *turns[-2:]])
    fitted = fit_chat(tok, messages, len(newest_two))
    assert fitted.ids == newest_two and fitted.dropped_messages == 4  # the system message is kept
    cut = fit_chat(tok, [{"role": "user", "content": "abcdefgh " * 40}], 12)
    assert len(cut.ids) == 12 and cut.truncated and cut.ids[-2:] == [special_id(tok, END), special_id(tok, ASSISTANT)]
    assert tok.decode(cut.ids[1:-2]) == tok.decode(tok.encode_ordinary("abcdefgh " * 40)[-9:])  # its end is kept


def test_routing_record_matches_a_full_forward(loaded):
    model, tok = loaded.model, loaded.tokenizer
    config = model.config
    reply = generate_reply(model, tok, CONVERSATION, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=4))
    pieces = list(reply)
    n = len(reply.token_ids)
    layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert 1 <= n <= 12 and len(reply.routing) == n and reply.routing.layers == layers
    for step in reply.routing.experts:
        assert sorted(step) == layers
        for ids in step.values():
            assert len(ids) == config.num_experts_per_tok == len(set(ids))
            assert all(0 <= e < config.n_routed_experts for e in ids)
    load = reply.routing.load()
    assert len(load) == config.n_routed_experts and sum(load) == n * config.num_experts_per_tok * len(layers)

    # reference: one uncached forward over prompt + reply; token t was chosen by position prompt_len - 1 + t
    moe = model.moe_layers(include_mtp=False)
    full = torch.tensor([reply.prompt.ids + reply.token_ids])
    with torch.no_grad(), recording_routing(moe):
        model(full)
        start = len(reply.prompt.ids) - 1
        expected = torch.stack([m.last_expert_ids[0, start:start + n] for _, m in moe], dim=1)  # [n, layers, k]
    assert torch.equal(reply.routing.as_tensor().sort(-1).values, expected.sort(-1).values)
    assert not any(m.record_routing for _, m in moe)  # recording is switched off again
    assert "".join(pieces) == reply.text


def test_seeded_replies_repeat_and_stream_reassembles(loaded):
    model, tok = loaded.model, loaded.tokenizer

    def run(seed: int) -> ReplyStream:
        reply = generate_reply(model, tok, CONVERSATION, SamplingConfig(max_new_tokens=24, temperature=1.0,
                                                                        top_k=0, top_p=1.0, seed=seed))
        reply.pieces = list(reply)
        return reply

    first, again, other = run(11), run(11), run(12)
    assert first.token_ids == again.token_ids and first.pieces == again.pieces
    assert first.routing.experts == again.routing.experts
    assert first.token_ids != other.token_ids
    for reply in (first, other):
        text_ids = [t for t in reply.token_ids if t not in reply_stop_ids(tok)]
        assert "".join(reply.pieces) == reply.text == tok.decode(text_ids)  # tiktoken decodes with "replace"
        assert reply.finish_reason == ("stop" if len(text_ids) < len(reply.token_ids) else "length")
        assert len(reply.pieces) > 1 or len(text_ids) <= 1  # streamed, not one piece at the end


def test_reply_ends_at_the_end_marker(loaded):
    """A head that makes <|end|> the greedy choice after the prompt: the reply is empty and has one routed token."""
    model, tok = copy.deepcopy(loaded.model), loaded.tokenizer
    prompt = fit_chat(tok, CONVERSATION, 100)
    with torch.no_grad():
        _, hidden = model.decode_step(torch.tensor([prompt.ids]), model.new_cache(1, len(prompt.ids)))
        model.lm_head.weight.zero_()
        model.lm_head.weight[special_id(tok, END)] = model.model.norm(hidden[0, -1])  # logit |h|^2 > 0 = others
    reply = ReplyStream(model, tok, prompt, SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert list(reply) == [] and reply.text == ""
    assert reply.finish_reason == "stop" and reply.token_ids == [special_id(tok, END)] and len(reply.routing) == 1


def test_prompt_budget_and_loading_errors(loaded, tiny_checkpoint, tmp_path):
    with pytest.raises(DataError, match="max new tokens 512: expected 1 .. 511"):
        generate_reply(loaded.model, loaded.tokenizer, CONVERSATION, SamplingConfig(max_new_tokens=512))
    with pytest.raises(CheckpointError, match="no complete checkpoint under .*deepspeed launch/train.py"):
        load_chat_model(None, runs_dir=tmp_path / "runs")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="cannot load this checkpoint") as err:
        load_chat_model(broken)
    assert "\n" not in str(err.value)
