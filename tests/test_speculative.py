"""Self-speculative decoding (the MTP block drafts, the main model verifies) and the MTP acceptance metric.

References: plain latent-cache greedy and the uncached full forward for greedy output; the main model's own
sampling distribution, computed exactly from full forwards, for speculative sampling (chi-square); a naive
per-position loop for the teacher-forced acceptance metric."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CORPUS, shrunk_tiny

from gpt_moe.data.chat_template import ChatPrompt
from gpt_moe.data.tokenizer import train_bpe
from gpt_moe.errors import ConfigError
from gpt_moe.model.model import DeepSeekForCausalLM
from gpt_moe.model.mtp_acceptance import mtp_agreement
from gpt_moe.serve.chat import ReplyStream
from gpt_moe.serve.generate import (DecodeStats, SamplingConfig, SelfSpeculativeDecoder, generate_ids, sampling_logits,
                                    speculative_accept)
from gpt_moe.train.evaluator import greedy_uncached

GREEDY = SamplingConfig(max_new_tokens=64, temperature=0)


@pytest.fixture(scope="module")
def trained() -> tuple[DeepSeekForCausalLM, torch.Tensor]:
    """A micro model trained briefly (AdamW, LM + MTP loss) on the repetitive test corpus, and the corpus ids:
    its MTP block agrees with the main model often, but not always."""
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    ids = torch.tensor(tokenizer.encode_ordinary(CORPUS))
    model = DeepSeekForCausalLM(shrunk_tiny(vocab_size=tokenizer.n_vocab, max_position_embeddings=512), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        rows = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(rows[:, :-1], labels=rows[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), ids


DRAFT_TOKENS = (1, 2, 3)


def greedy_three_ways(model: DeepSeekForCausalLM, prompts: list[list[int]],
                      greedy: SamplingConfig = GREEDY) -> dict[int, DecodeStats]:
    """Asserts speculative greedy with 1, 2 and 3 drafts per step = plain cached greedy = uncached greedy for every
    prompt; returns the drafts' statistics by drafts per step."""
    stats = {k: DecodeStats() for k in DRAFT_TOKENS}
    for prompt in prompts:
        plain = [int(t) for t in generate_ids(model, [prompt], greedy)]
        if greedy.repetition_penalty == 1.0:
            uncached = greedy_uncached(model, torch.tensor([prompt]), greedy.max_new_tokens)[0, len(prompt):]
            assert plain == uncached.tolist(), f"prompt {prompt}"
        for k in DRAFT_TOKENS:
            speculative = generate_ids(model, [prompt], dataclasses.replace(greedy, speculative=True, draft_tokens=k),
                                       stats=stats[k])
            assert [int(t) for t in speculative] == plain, f"prompt {prompt}, {k} drafts per step"
    return stats


def test_greedy_speculative_equals_plain_greedy_on_a_trained_model(trained):
    model, ids = trained
    prompts = [ids[s:s + 3 + s % 29].tolist() for s in range(0, 20 * 37, 37)]
    for k, stats in greedy_three_ways(model, prompts).items():
        assert 0 < stats.accepted < stats.drafted, (k, stats)  # the drafts are right sometimes, not always
        assert stats.accepted_length == (stats.accepted + stats.forwards) / stats.forwards > 1
        assert len(stats.reached) == k and stats.reached[0] == stats.forwards


def test_greedy_speculative_with_a_repetition_penalty_equals_plain_greedy(trained):
    """The penalty makes each position's choice depend on the drafts before it: verified one position at a time."""
    model, ids = trained
    prompts = [ids[s:s + 5 + s % 17].tolist() for s in range(0, 6 * 53, 53)]
    greedy_three_ways(model, prompts, dataclasses.replace(GREEDY, max_new_tokens=32, repetition_penalty=1.3))


def test_a_draft_vocabulary_of_the_first_ids_keeps_greedy_output_and_drafts_only_from_it(trained):
    """`draft_vocab`: drafts scored over the first ids only; the main model still decides every token."""
    model, ids = trained
    prompts = [ids[s:s + 4 + s % 23].tolist() for s in range(0, 8 * 41, 41)]
    limited = dataclasses.replace(GREEDY, speculative=True, draft_tokens=2, draft_vocab=120)
    stats = DecodeStats()
    for prompt in prompts:
        plain = [int(t) for t in generate_ids(model, [prompt], GREEDY)]
        assert [int(t) for t in generate_ids(model, [prompt], limited, stats=stats)] == plain
        decoder = SelfSpeculativeDecoder(model, limited, len(prompt) + 8)
        with torch.no_grad():
            decoder.prefill(torch.tensor([prompt]))
            drafts, _ = decoder.draft(3)
        assert max(drafts) < 120
    assert 0 < stats.accepted < stats.drafted
    assert any(t >= 120 for prompt in prompts for t in generate_ids(model, [prompt], GREEDY))


def test_greedy_speculative_equals_plain_greedy_on_an_untrained_model():
    model = DeepSeekForCausalLM(shrunk_tiny(), seed=4).eval()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (1 + n % 13,), generator=generator).tolist() for n in range(20)]
    greedy_three_ways(model, prompts)


def test_a_stop_token_inside_an_accepted_run_and_max_new_tokens_mid_draft_end_where_plain_decoding_does(trained):
    """Speculative steps yield several tokens: generation must still end at the first stop token and after exactly
    max_new_tokens, and the stop token chosen here is one that a step yields before the end of its run."""
    model, ids = trained
    prompt = ids[200:230].tolist()
    plain = [int(t) for t in generate_ids(model, [prompt], GREEDY)]
    decoder = SelfSpeculativeDecoder(model, dataclasses.replace(GREEDY, draft_tokens=3), len(prompt) + 64 + 3)
    with torch.no_grad():
        runs = [decoder.prefill(torch.tensor([prompt])).tolist()]
        while sum(map(len, runs)) < 40:
            runs.append(decoder.step())
    inside = [run[j] for run in runs for j in range(len(run) - 1)]  # tokens a step yields before its last one
    assert inside, runs
    stop = inside[0]
    for k in DRAFT_TOKENS:
        speculative = dataclasses.replace(GREEDY, speculative=True, draft_tokens=k)
        stopped = [int(t) for t in generate_ids(model, [prompt], speculative, stop_ids={stop})]
        assert stopped == plain[:plain.index(stop) + 1]
        for limit in range(1, 12):
            assert [int(t) for t in generate_ids(model, [prompt], dataclasses.replace(speculative,
                                                                                     max_new_tokens=limit))] \
                == plain[:limit], (k, limit)


def test_each_token_of_a_speculative_step_shows_the_routing_plain_decoding_gives_it(trained):
    """`DecodeStats.predictor`: the chat stream reads the j-th token of a step's routing at the verifying forward's
    position j; token by token it must be the routing of plain decoding (on a model that accepts drafts)."""
    model, ids = trained
    tokenizer = train_bpe([CORPUS], vocab_size=300)
    prompt = ChatPrompt(ids[300:340].tolist())
    streams = {}
    for k in (0, 3):
        sampling = dataclasses.replace(GREEDY, max_new_tokens=40, speculative=k > 0, draft_tokens=max(k, 1))
        streams[k] = ReplyStream(model, tokenizer, prompt, sampling, stop_ids=set())
        list(streams[k])
    assert streams[3].token_ids == streams[0].token_ids and streams[3].stats.accepted_length > 2
    assert streams[3].routing.experts == streams[0].routing.experts


def test_decode_stats_count_each_draft_position():
    """Three steps of 3 drafts accepting 3, 1 and 0, then one of 2 drafts accepting 2: counted by hand."""
    stats = DecodeStats()
    for drafts, accepted in ((3, 3), (3, 1), (3, 0), (2, 2)):
        stats.count_step(drafts, accepted)
    assert (stats.forwards, stats.drafted, stats.accepted) == (4, 11, 6)
    assert stats.reached == [4, 3, 1] and stats.accepted_at == [3, 2, 1]
    assert stats.acceptance_by_position() == [3 / 4, 2 / 3, 1.0]
    assert stats.accepted_length == 10 / 4 and stats.acceptance == 6 / 11


# ------------------------------------------------------------------ speculative sampling keeps the distribution
SMALL_VOCAB = 4
PROMPT = [1, 2, 3, 0]
SAMPLED = SamplingConfig(max_new_tokens=3, temperature=0.9, top_k=0, top_p=1.0, repetition_penalty=1.2)


def target_joint(model: DeepSeekForCausalLM) -> torch.Tensor:
    """[vocab, vocab, vocab] probability of the first three sampled tokens under plain sampling, exactly:
    the product of the main model's sampling distributions from full forwards over every prefix."""
    def probs(prefix: list[int]) -> torch.Tensor:
        ids = torch.tensor([prefix])
        return sampling_logits(model(ids).logits[:, -1], ids, SAMPLED)[0].softmax(-1).double()

    joint = torch.zeros(SMALL_VOCAB, SMALL_VOCAB, SMALL_VOCAB, dtype=torch.float64)
    first = probs(PROMPT)
    for a in range(SMALL_VOCAB):
        second = probs(PROMPT + [a])
        for b in range(SMALL_VOCAB):
            joint[a, b] = first[a] * second[b] * probs(PROMPT + [a, b])
    return joint


def speculative_counts(model: DeepSeekForCausalLM, draws: int, accept, draft_tokens: int,
                       draft_vocab: int | None = None) -> torch.Tensor:
    """[vocab, vocab, vocab] counts of the first three tokens of `draws` speculative generations (seeded)."""
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(SMALL_VOCAB, SMALL_VOCAB, SMALL_VOCAB, dtype=torch.float64)
    sampling = dataclasses.replace(SAMPLED, draft_tokens=draft_tokens, draft_vocab=draft_vocab)
    with torch.no_grad():
        for _ in range(draws):
            decoder = SelfSpeculativeDecoder(model, sampling, len(PROMPT) + 3 + draft_tokens, generator, accept)
            tokens = decoder.prefill(torch.tensor([PROMPT])).tolist()
            while len(tokens) < 3:
                tokens += decoder.step()
            counts[tuple(tokens[:3])] += 1
    return counts


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probabilities; cells expecting fewer than 5 draws are pooled."""
    expected, observed = probs.flatten() * counts.sum(), counts.flatten()
    small = expected < 5
    expected = torch.cat((expected[~small], expected[small].sum()[None]))
    observed = torch.cat((observed[~small], observed[small].sum()[None]))
    statistic = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def wrong_accept(p, q, draft, generator):
    """The rule with target and draft swapped: accept with min(1, q/p), resample from max(0, q - p)."""
    return speculative_accept(q, p, draft, generator)


@pytest.fixture(scope="module")
def small_vocab_model() -> DeepSeekForCausalLM:
    """Untrained, with a large init so that the main model's and the MTP block's distributions are far apart."""
    return DeepSeekForCausalLM(shrunk_tiny(vocab_size=SMALL_VOCAB, initializer_range=0.2), seed=2).eval()


@pytest.mark.parametrize("draft_tokens, draft_vocab", [(1, None), (2, None), (2, 2)])
def test_speculative_sampling_matches_the_main_models_distribution(small_vocab_model, draft_tokens, draft_vocab):
    """With 2 drafts per step the 2nd and 3rd tokens are a chained draft's, accepted or corrected by the rule;
    with a draft vocabulary of 2 of the 4 ids, half the tokens can only come from the correction."""
    with torch.no_grad():
        probs = target_joint(small_vocab_model)
    counts = speculative_counts(small_vocab_model, 1000, speculative_accept, draft_tokens, draft_vocab)
    assert chi_square_p_value(counts, probs) > 1e-3


@pytest.mark.parametrize("draft_tokens", [1, 2])
def test_a_wrong_acceptance_rule_fails_the_same_test(small_vocab_model, draft_tokens):
    with torch.no_grad():
        probs = target_joint(small_vocab_model)
    counts = speculative_counts(small_vocab_model, 300, wrong_accept, draft_tokens)
    assert chi_square_p_value(counts, probs) < 1e-3


# ------------------------------------------------------------------ refusals
def test_a_model_without_mtp_block_and_a_batch_are_refused(small_config):
    cfg = dataclasses.replace(GREEDY, speculative=True)
    plain = DeepSeekForCausalLM(small_config.replace(num_nextn_predict_layers=0), seed=0).eval()
    with pytest.raises(ConfigError, match="no MTP block|has none"):
        list(generate_ids(plain, [[1, 2]], cfg))
    with pytest.raises(ConfigError, match="batch of 2"):
        list(generate_ids(DeepSeekForCausalLM(small_config, seed=0).eval(), [[1, 2], [3]], cfg))


# ------------------------------------------------------------------ the teacher-forced acceptance metric
def naive_agreement(model: DeepSeekForCausalLM, ids: list[int], labels: list[int]) -> tuple[int, int]:
    """Position by position on one sequence: the main model's top token for t+2 from a full forward over
    ids[:t+2]; the MTP block's from the cached model's hidden states over ids[:t+1] and the token t+1."""
    agree = counted = 0
    mtp = model.model.mtp_layer
    for t in range(len(ids) - 1):
        if labels[t + 1] == -100:
            continue
        main_top = int(model(torch.tensor([ids[: t + 2]])).logits[0, -1].argmax())
        _, hidden = model.decode_step(torch.tensor([ids[: t + 1]]), model.new_cache(1, t + 1))
        cos, sin = model.model.rotary_emb(torch.arange(t + 1), hidden.dtype)
        out, _ = mtp.predict(hidden, model.model.embed_tokens(torch.tensor([ids[1: t + 2]])), cos, sin)
        agree += int(model.lm_head(out[0, -1]).argmax()) == main_top
        counted += 1
    return agree, counted


@torch.no_grad()
def test_acceptance_metric_equals_a_naive_loop_for_plain_and_packed_rows(trained):
    model, ids = trained
    rows = torch.stack([ids[100:140], ids[400:440]])
    labels = torch.cat((rows[:, 1:], torch.full((2, 1), -100)), dim=1)
    labels[1, 5:12] = -100  # untrained tokens are not counted
    expected = [naive_agreement(model, rows[r].tolist(), labels[r].tolist()) for r in range(2)]
    assert mtp_agreement(model, rows, labels).tolist() == [sum(e[0] for e in expected), sum(e[1] for e in expected)]
    assert 0 < sum(e[0] for e in expected) < sum(e[1] for e in expected)

    # a packed row: two conversations of 25 and 15 tokens, positions restart, nothing counted across
    segments = torch.tensor([[0] * 25 + [1] * 15])
    positions = torch.cat((torch.arange(25), torch.arange(15)))[None]
    packed_labels = labels[:1].clone()
    packed_labels[0, 24] = -100  # the last token of a conversation has no next token inside it
    parts = [(rows[0, :25].tolist(), packed_labels[0, :25].tolist()),
             (rows[0, 25:].tolist(), packed_labels[0, 25:].tolist())]
    expected = [naive_agreement(model, part_ids, part_labels) for part_ids, part_labels in parts]
    got = mtp_agreement(model, rows[:1], packed_labels, position_ids=positions, segment_ids=segments)
    assert got.tolist() == [sum(e[0] for e in expected), sum(e[1] for e in expected)]
