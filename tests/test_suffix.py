"""SuffixDecoding: the index's counts and bound, greedy identity and exact sampling with suffix drafts, the
hybrid choice, and the index shared between replicas through a real redis-server."""
import random

import pytest
import torch

from onspec.actors.requests import SamplingParams
from onspec.actors.suffix_index import SuffixIndex
from onspec.kernels.verify import rejection_verify
from tests.conftest import tiny_engine

# Prompts with repeats in them (what the per-request index feeds on) and without.
PROMPTS = [[5, 9, 13, 5, 9, 13, 5, 9], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 40, 41, 40], [77, 3]]


# ---- the index --------------------------------------------------------------------------------------------------
def test_proposals_follow_the_most_frequent_continuation_with_its_frequency():
    ix = SuffixIndex()
    ix.add([1, 2, 3, 4, 5])
    ix.add([9, 2, 3, 4, 6])
    ix.add([8, 2, 3, 7, 7])
    d = ix.propose([0, 2, 3], max_len=8, alpha=4.0, min_prob=0.1)
    # (2, 3) was followed by 4 twice and 7 once; after (2, 3, 4): 5 once, 6 once.
    assert d.tokens[:2] == [4, 5] and d.probs[:2] == pytest.approx([2 / 3, 1 / 3])
    # A longer match narrows the node to the one sequence that matches it: certain, budget alpha * m.
    d = ix.propose([9, 2, 3], max_len=8, alpha=1.0)
    assert d.match_len == 3 and d.tokens == [4, 6] and d.probs == [1.0, 1.0]
    assert ix.propose([9, 2, 3], max_len=8, alpha=0.5).tokens == [4, 6]  # ceil(0.5 * 3) = 2
    assert ix.propose([5, 4], max_len=8) is None  # never seen with a continuation
    # Below min_prob the draft stops.
    assert ix.propose([0, 2, 3], max_len=8, alpha=4.0, min_prob=0.5).tokens == [4]


def test_the_bound_holds_under_a_stream_of_long_inputs():
    rng = random.Random(0)
    ix = SuffixIndex(max_tokens=2000, max_occurrences=32)
    for i in range(400):
        n = rng.choice([5, 50, 500, 5000])  # some longer than the whole bound
        ix.add([rng.randrange(64) for _ in range(n)])
        st = ix.stats()
        assert st["tokens"] <= 2000 and st["keys"] <= 2000 and st["positions"] <= 2000, st
    assert st["positions"] == sum(len(v) for v in ix.index.values())
    # Every kept position still points inside the buffer; evicted sequences no longer propose anything.
    assert all(p - 2 >= ix.base for v in ix.index.values() for p in v)
    old = SuffixIndex(max_tokens=100)
    old.add([7, 8, 9, 10])
    for _ in range(10):
        old.add([rng.randrange(20, 60) for _ in range(30)])
    assert old.propose([7, 8], 4) is None


def test_one_hot_proposals_keep_sampling_exact():
    """Speculative sampling with a deterministic draft (q one-hot at x): accept with p(x), else sample from p
    with x removed. The first emitted token must be distributed as p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 12, generator=gen) * 2, -1).repeat(2, 1)
    draft = torch.tensor([3])
    q = torch.zeros(1, 12)
    q[0, 3] = 1.0
    n_runs = 8000
    counts = torch.zeros(12)
    for _ in range(n_runs):
        n, nxt = rejection_verify(draft, q, p, gen)
        counts[3 if n == 1 else nxt] += 1
    assert (counts / n_runs - p[0]).abs().max() < 0.02  # about 3 standard errors


# ---- the engine ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["model", "suffix", "hybrid"])
def test_greedy_output_equals_the_target_alone_with_every_source(source):
    eng = tiny_engine(drafter_layers=1, mode="adaedl", max_draft=4, source=source)
    eng.suffix_cfg = eng.suffix_cfg.model_copy(update={"max_draft": 6})
    totals = {"model": 0, "suffix": 0}
    for rep in range(2):  # the second pass finds the first pass's outputs in the shared index
        for prompt in PROMPTS:
            for n in (1, 9, 40):
                params = SamplingParams(max_tokens=n)
                ref = eng.generate(prompt, params, speculate=False)
                got = eng.generate(prompt, params, speculate=True)
                assert got.token_ids == ref.token_ids, (source, prompt, n)
                for s in totals:
                    totals[s] += got.stats.sources[s][1]
                st = got.stats
                assert st.drafted == sum(v[1] for v in st.sources.values())
                assert st.accepted == sum(v[2] for v in st.sources.values())
    if source == "model":
        assert totals["suffix"] == 0 and totals["model"] > 0
    elif source == "suffix":
        assert totals["model"] == 0 and totals["suffix"] > 0
    else:
        assert totals["suffix"] > 0


def test_sampling_with_suffix_drafts_matches_the_target_alone(monkeypatch):
    """Unseeded requests (the rejection rule with a one-hot q); torch.seed counts up for reproducibility."""
    eng = tiny_engine(source="suffix")
    runs = 800
    params = dict(max_tokens=2, temperature=1.3, top_p=0.95)
    prompt = [40, 41, 40, 41, 40]

    def histogram(speculate, offset):
        h, drafted = {}, 0
        seeds = iter(range(offset, offset + runs))
        monkeypatch.setattr(torch, "seed", lambda: next(seeds))
        for i in range(runs):
            g = eng.generate(prompt, SamplingParams(**params), speculate=speculate)
            h[tuple(g.token_ids)] = h.get(tuple(g.token_ids), 0) + 1
            drafted += g.stats.sources["suffix"][1]
        return h, drafted

    ref, _ = histogram(False, 0)
    spec, drafted = histogram(True, 10**6)
    keys = set(ref) | set(spec)
    tvd = 0.5 * sum(abs(ref.get(k, 0) - spec.get(k, 0)) for k in keys) / runs
    assert drafted > runs / 2  # suffix drafts were really made (and judged) along the way
    # Sampling noise alone gives a TVD around 0.05-0.08 here; accepting a deterministic draft without the
    # p(x) test would pile the mass on the drafted token and give far more.
    assert tvd < 0.15, tvd


def test_a_suffix_draft_is_cut_where_verifying_more_stops_paying():
    from onspec.actors.suffix_index import SuffixDraft
    eng = tiny_engine(drafter_layers=1, source="suffix")
    # verifying 5 tokens costs a step more than 4 (the 4-bit kernel's blocks of 4 rows)
    eng.controller.verify_cost = [1.0, 1.05, 1.1, 1.15, 2.0, 2.05, 2.1]
    d = SuffixDraft([5, 6, 7, 8, 9, 10], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], 4)
    assert eng._trimmed(d).tokens == [5, 6, 7]  # 3.4 tokens for 1.15 beats 3.7 for 2.0
    assert eng._trimmed(SuffixDraft([5], [0.01], 1)) is None  # 1.01 tokens for 1.05: worse than plain
    eng.controller.verify_cost = [1.0] * 7  # flat costs (a GPU's): nothing is cut
    assert eng._trimmed(d).tokens == d.tokens


def test_hybrid_prefers_the_suffix_only_when_it_pays():
    eng = tiny_engine(drafter_layers=3, source="hybrid", cost_aware=True)
    eng.controller.verify_cost = [1.0] * 20
    eng.controller.draft_cost = 0.05
    from onspec.actors.suffix_index import SuffixDraft
    eng.controller.alpha = 0.9  # a drafter the target agrees with: an unsure suffix draft loses to it
    assert not eng._suffix_pays(SuffixDraft([1, 2], [0.3, 0.1], 2))
    assert eng._suffix_pays(SuffixDraft([1, 2, 3, 4, 5, 6], [1.0] * 6, 12))
    eng.controller.alpha = 0.0  # a useless drafter: any likely suffix draft beats plain decoding
    assert eng._suffix_pays(SuffixDraft([1], [0.5], 2))
    # As observed: the drafter model's rounds lose to plain ones (1.2 tokens in 1.5x the time), so even an
    # unsure proposal is taken, as suffix-only decoding takes it
    eng.controller.alpha = 0.9
    weak = SuffixDraft([1, 2], [0.3, 0.1], 2)
    eng.controller.observe_round("none", 1, 0.010)
    eng.controller.observe_round("model", 1.2, 0.015)
    assert eng.controller.model_speedup() < 1.0 and eng._suffix_pays(weak)
    # model rounds that pay (2.5 tokens in 1.2x the time) and suffix rounds that did worse: the score decides
    eng.controller.reset()
    eng.controller.observe_round("none", 1, 0.010)
    eng.controller.observe_round("model", 2.5, 0.012)
    eng.controller.observe_round("suffix", 1.1, 0.012)
    assert not eng._suffix_pays(weak)
    eng.controller.observe_round("suffix", 40, 0.012)  # now suffix rounds have done better than the model's
    assert eng._suffix_pays(weak)


def test_repeated_requests_get_drafts_from_the_suffix_source_on_the_real_model(real_engine):
    """A repeated-request workload: the suffix source turns earlier outputs into accepted tokens, where decoding
    without drafts gets one token per target forward."""
    eng = real_engine
    old = eng.spec
    eng.spec = old.model_copy(update={"source": "suffix"})
    try:
        prompts = [eng.encode(messages=[{"role": "user", "content": t}]) for t in
                   ("List three colours.", "What is a prime number?")]
        params = SamplingParams(max_tokens=24)
        first = [eng.generate(p, params) for p in prompts]
        again = [eng.generate(p, params) for p in prompts]
        plain = [eng.generate(p, params, speculate=False) for p in prompts]
    finally:
        eng.spec = old
    for a, b, c in zip(first, again, plain):
        assert a.token_ids == b.token_ids == c.token_ids
    steps = lambda gs: sum(g.stats.completion_tokens for g in gs) / sum(g.stats.target_forwards for g in gs)
    assert steps(plain) == 1.0
    assert sum(g.stats.sources["suffix"][2] for g in again) >= 0.5 * sum(g.stats.completion_tokens for g in again)
    assert steps(again) > 2.0


# ---- sharing between replicas -----------------------------------------------------------------------------------
def test_replicas_share_finished_requests_through_redis(redis_server):
    import redis
    from onspec.actors.suffix_share import SuffixSharer
    from onspec.actors.config import SuffixConfig
    from tests.conftest import poll

    cfg = SuffixConfig(stream_key="test:suffix")
    a_eng, b_eng = tiny_engine(source="suffix"), tiny_engine(source="suffix")
    client = lambda: redis.Redis.from_url(redis_server.url, socket_timeout=5)
    a = SuffixSharer(client(), cfg, "a", a_eng.suffix_inbox.append, block_ms=50).start()
    b = SuffixSharer(client(), cfg, "b", b_eng.suffix_inbox.append, block_ms=50).start()
    a_eng.sequence_observer, b_eng.sequence_observer = a.publish, b.publish
    try:
        prompt, params = [11, 12, 13], SamplingParams(max_tokens=30)
        ref = a_eng.generate(prompt, params)  # served by replica a
        poll(lambda: b.received >= 1, "replica b never received a's request")
        got = b_eng.generate(prompt, params)  # the same request on replica b
        assert got.token_ids == ref.token_ids
        assert got.stats.sources["suffix"][2] >= 20  # b drafted a's output from the shared index
        assert a.received == 0  # a does not index its own request twice
        # A replica started later warms up from the stream.
        c_eng = tiny_engine(source="suffix")
        c = SuffixSharer(client(), cfg, "c", c_eng.suffix_inbox.append, block_ms=50).start()
        try:
            poll(lambda: c.received >= 2, "a new replica did not warm up from the stream")
        finally:
            c.close()
    finally:
        a.close()
        b.close()
