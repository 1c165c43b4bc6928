"""Generation: cached decoding equals uncached greedy decoding; sampling is seeded; streams reassemble."""

import torch

from gpt_moe.generate import SamplingConfig, TextStream, generate_ids, greedy_uncached, sample_next, stream_text
from gpt_moe.model import DeepSeekForCausalLM
from gpt_moe.tokenizer import train_bpe


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
    pieces = list(stream_text(model, tokenizer, prompt, cfg, stop_ids=set()))
    limited = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=11, vocab_limit=tokenizer.n_vocab)
    ids = torch.stack(list(generate_ids(model, [prompt], limited)))
    full = tokenizer.decode_bytes(ids[:, 0].tolist()).decode("utf-8", errors="replace")
    assert "".join(pieces) == full
    stream = TextStream(tokenizer)
    emoji = "🙂".encode()
    parts = [stream.push(tokenizer.encode_single_token(bytes([b]))) for b in emoji]
    assert parts[:3] == ["", "", ""] and parts[3] == "🙂"
