"""Generation: cached decoding equals uncached greedy decoding; sampling is seeded; streams reassemble and stop
where a stop string begins."""

import math

import pytest
import torch

from gpt_moe.data.chat_template import ChatPrompt
from gpt_moe.data.tokenizer import train_bpe
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.serve.chat import ReplyStream
from gpt_moe.serve.generate import SamplingConfig, TextStream, generate_ids, sample_next, sampling_logits
from gpt_moe.train.evaluator import greedy_uncached


def test_latent_cache_greedy_equals_full_forward_greedy_for_a_ragged_batch(small_config):
    model = DeepSeekForCausalLM(small_config, seed=4).eval()
    prompts = [[5, 9, 2, 7, 1, 3], [8, 4], [11, 12, 13]]
    steps = torch.stack(list(generate_ids(model, prompts, SamplingConfig(max_new_tokens=24, temperature=0))), dim=1)
    for row, prompt in enumerate(prompts):
        expected = greedy_uncached(model, torch.tensor([prompt]), 24)[0, len(prompt):]
        assert steps[row].tolist() == expected.tolist()


def test_seeded_sampling_repeats_and_respects_top_k():
    logits = torch.randn(4, 100)
    cfg = SamplingConfig(temperature=1.0, top_k=5, top_p=1.0, seed=3)
    draws = [sample_next(logits, torch.zeros(4, 0, dtype=torch.long), cfg, torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    allowed = logits.topk(5, dim=-1).indices
    many = torch.stack([sample_next(logits, torch.zeros(4, 0, dtype=torch.long), cfg, None) for _ in range(50)])
    assert all(int(t) in allowed[row].tolist() for row in range(4) for t in many[:, row])


def test_top_p_keeps_the_smallest_set_holding_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=0.7)
    seen = {int(sample_next(logits, torch.zeros(1, 0, dtype=torch.long), cfg, None)) for _ in range(200)}
    assert seen == {0, 1}


def test_stream_reassembles_and_never_splits_characters(small_config):
    tokenizer = train_bpe(["héllo wörld 🙂 " * 40], vocab_size=300)
    model = DeepSeekForCausalLM(small_config.replace(vocab_size=320), seed=6).eval()
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=11)
    prompt = tokenizer.encode_ordinary("héllo")
    reply = ReplyStream(model, tokenizer, ChatPrompt(prompt), cfg, stop_ids=set())
    pieces = list(reply)
    limited = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=11, vocab_limit=tokenizer.n_vocab)
    ids = torch.stack(list(generate_ids(model, [prompt], limited)))
    assert reply.token_ids == ids[:, 0].tolist()  # the stream samples within the tokenizer's vocabulary
    full = tokenizer.decode_bytes(ids[:, 0].tolist()).decode("utf-8", errors="replace")
    assert "".join(pieces) == full == reply.text and reply.finish_reason == "length"
    stream = TextStream(tokenizer)
    emoji = "🙂".encode()
    parts = [stream.push(tokenizer.encode_single_token(bytes([b]))) for b in emoji]
    assert parts[:3] == ["", "", ""] and parts[3] == "🙂"


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_end_the_text_before_the_first_of_them(small_config, seed):
    """Against the same seeded reply without stop strings, cut by hand at the earliest occurrence of any stop."""
    tokenizer = train_bpe(["the cat sat on the mat; the dog ran. " * 40], vocab_size=300)
    model = DeepSeekForCausalLM(small_config.replace(vocab_size=320), seed=seed).eval()
    prompt = ChatPrompt(tokenizer.encode_ordinary("the cat"))
    free = ReplyStream(model, tokenizer, prompt, SamplingConfig(max_new_tokens=40, temperature=1.0, seed=seed),
                       stop_ids=set())
    whole = "".join(free)
    stops = (whole[7:10], whole[12:13] + "x", "t") if len(whole) > 13 else ("t",)
    found = [i for i in (whole.find(stop) for stop in stops) if i >= 0]
    cut = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=seed, stop=stops)
    reply = ReplyStream(model, tokenizer, prompt, cut, stop_ids=set())
    pieces = list(reply)
    assert "".join(pieces) == reply.text == (whole[:min(found)] if found else whole)
    assert reply.finish_reason == ("stop" if found else "length")
    assert not any(stop in "".join(pieces) for stop in stops)


def test_top_k_then_top_p_equals_a_per_token_reference():
    """`sampling_logits` sorts only the tokens top-k kept; a plain loop over each row's sorted tokens decides the same
    set (a token stays when the tokens ranked above it hold at most top_p of the top-k mass)."""
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(7)) * 3
    for top_k, top_p in ((50, 0.9), (0, 0.8), (7, 0.5), (50, 1.0)):
        cfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
        got = sampling_logits(logits, torch.zeros(3, 0, dtype=torch.long), cfg)
        for row in range(3):
            scaled = (logits[row] / 0.7).tolist()
            ranked = sorted(range(500), key=lambda i: -scaled[i])[: top_k or 500]
            weights = [math.exp(scaled[i] - scaled[ranked[0]]) for i in ranked]
            kept, above = set(), 0.0
            for token, weight in zip(ranked, weights):
                if above / sum(weights) <= top_p:
                    kept.add(token)
                above += weight
            assert {i for i in range(500) if got[row, i] > float("-inf")} == kept, (top_k, top_p, row)
            assert all(abs(float(got[row, i]) - scaled[i]) < 1e-4 for i in kept)
