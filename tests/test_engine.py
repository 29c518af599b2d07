"""Engine behaviour on tiny randomly initialised models (fast); the real model has its own tests."""
import pytest
import torch

from onspec.actors.requests import RequestError, SamplingParams
from onspec.actors.row_cache import RowCache, body_forward
from tests.conftest import tiny_engine, tiny_target

PROMPTS = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41, 40, 41, 40], [77]]


@pytest.mark.parametrize("mode", ["fixed", "adaedl"])
@pytest.mark.parametrize("drafter_layers", [1, 3])  # 3 of 4 layers: mostly accepted; 1 layer: mostly rejected
def test_greedy_speculative_equals_target_alone(mode, drafter_layers):
    eng = tiny_engine(drafter_layers=drafter_layers, mode=mode, fixed_k=3, max_draft=5)
    drafted = accepted = 0
    for prompt in PROMPTS:
        for n in (1, 7, 30):
            params = SamplingParams(max_tokens=n)
            ref = eng.generate(prompt, params, speculate=False)
            got = eng.generate(prompt, params, speculate=True)
            assert got.token_ids == ref.token_ids, (prompt, n)
            assert len(got.token_ids) == n
            drafted += got.stats.drafted
            accepted += got.stats.accepted
    assert drafted > 0
    if drafter_layers == 3:
        assert accepted > 0
        if mode == "fixed":
            assert accepted < drafted  # both the accept and the reject paths ran


def test_no_speculate_never_calls_the_drafter():
    eng = tiny_engine()
    calls = []
    eng.drafter.register_forward_hook(lambda *a: calls.append(1))
    g = eng.generate(PROMPTS[0], SamplingParams(max_tokens=10), speculate=False)
    assert not calls and g.stats.drafted == 0 and g.stats.target_forwards == 10


def test_sampling_distribution_matches_target_alone(monkeypatch):
    """Two-token continuations sampled with and without speculation have the same distribution. Unseeded
    requests, i.e. the rejection rule; torch.seed (where an unseeded request gets its generator's seed) counts
    up instead, so that the run is reproducible."""
    eng = tiny_engine(drafter_layers=3, mode="fixed", fixed_k=2)
    runs = 1500
    params = dict(max_tokens=2, temperature=1.3, top_p=0.95)

    def histogram(speculate, offset):
        h = {}
        seeds = iter(range(offset, offset + runs))
        monkeypatch.setattr(torch, "seed", lambda: next(seeds))
        for i in range(runs):
            ids = eng.generate([5, 9], SamplingParams(**params), speculate=speculate).token_ids
            h[tuple(ids)] = h.get(tuple(ids), 0) + 1
        return h

    ref, spec = histogram(False, 0), histogram(True, 10**6)
    keys = set(ref) | set(spec)
    tvd = 0.5 * sum(abs(ref.get(k, 0) - spec.get(k, 0)) for k in keys) / runs
    # Sampling noise alone gives a TVD around 0.05-0.08 for this support; a biased rule gives far more.
    assert tvd < 0.12, tvd
    assert eng.controller.alpha > 0  # drafts were really accepted along the way


def test_seeded_sampling_is_the_target_alone_token_for_token():
    """A seeded request's token at each position comes from noise fixed by (seed, position) (coupled_verify):
    its output is target-only sampling with that seed whatever was drafted, from the model or from a shared
    suffix index that meanwhile learnt the answer."""
    eng = tiny_engine(drafter_layers=3, mode="fixed", fixed_k=3, source="hybrid")
    params = dict(max_tokens=24, temperature=1.0, top_k=50)
    prompt = [40, 41, 40, 41, 40]
    model_accepted = suffix_accepted = 0
    for seed in range(10):
        alone = eng.generate(prompt, SamplingParams(seed=seed, **params), speculate=False).token_ids
        first = eng.generate(prompt, SamplingParams(seed=seed, **params))
        again = eng.generate(prompt, SamplingParams(seed=seed, **params))  # the index holds ``first`` by now
        assert first.token_ids == alone == again.token_ids, seed
        model_accepted += first.stats.sources["model"][2] + again.stats.sources["model"][2]
        suffix_accepted += again.stats.sources["suffix"][2]
    assert model_accepted > 0 and suffix_accepted > 0  # both kinds of draft were really judged


def test_ragged_rows_through_the_row_cache_equal_each_sequence_alone():
    model = tiny_target()
    torch.manual_seed(1)
    rows = [torch.randint(0, 96, (n,)) for n in (7, 12, 3)]
    with torch.inference_mode():
        want = [model(input_ids=r[None]).logits[0] for r in rows]
        cache = RowCache(model.model, slots=4, capacity=4)   # grows as rows get longer
        lengths = torch.zeros(3, dtype=torch.long)
        got = [[] for _ in rows]
        for T in (3, 5, 4, 2):  # each row takes what it has left of T tokens; the rest is padding
            x = torch.zeros(3, T, dtype=torch.long)
            real = []
            for i, r in enumerate(rows):
                seg = r[int(lengths[i]):int(lengths[i]) + T]
                x[i, :len(seg)] = seg
                real.append(len(seg))
            logits = model.lm_head(body_forward(model.model, model.model.embed_tokens(x), cache, 0, lengths))
            for i, n in enumerate(real):
                got[i].append(logits[i, :n])
            lengths += torch.tensor(real)
    for g, w in zip(got, want):
        assert torch.allclose(torch.cat(g), w, atol=1e-5)


def test_a_rejection_only_shortens_the_row():
    model = tiny_target()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        cache = RowCache(model.model, slots=2)
        emb = model.model.embed_tokens
        body_forward(model.model, emb(ids[:, :5]), cache, 1, torch.tensor([0]))
        body_forward(model.model, emb(torch.tensor([[7, 7, 7]])), cache, 1, torch.tensor([5]))  # 3 rejected
        after = model.lm_head(body_forward(model.model, emb(ids[:, 5:]), cache, 1, torch.tensor([5])))
        fresh = model(input_ids=ids).logits[:, 5:]
    assert torch.allclose(after, fresh, atol=1e-5)


def test_a_poor_drafter_backs_off_to_plain_decoding():
    eng = tiny_engine(drafter_layers=1, cost_aware=True, max_draft=4, probe_interval=4)
    with torch.no_grad():  # a drafter that is always wrong
        eng.drafter.head.weight.normal_(0, 5.0)
    eng.controller.verify_cost = [1.0, 1.05, 1.1, 1.15, 1.2]
    eng.controller.draft_cost = 0.1
    eng.calibrated = True  # keep the cost table above, measured costs would be noise on a tiny model
    g = eng.generate([5, 9, 13], SamplingParams(max_tokens=120), speculate=True)
    ref = eng.generate([5, 9, 13], SamplingParams(max_tokens=120), speculate=False)
    assert g.token_ids == ref.token_ids
    assert g.stats.acceptance_rate < 0.2
    # After the estimate drops, only sparse probes draft: far fewer drafts than tokens.
    assert g.stats.drafted < 0.3 * g.stats.completion_tokens
    assert eng.controller.draft_cap() in (0, 1)


def test_model_rounds_that_lose_to_plain_ones_stop_drafting_and_probe_less_often():
    """A round of the drafter model costs a drafter forward even when AdaEDL stops before the first draft, which
    the acceptance estimate (per drafted token) never sees: the controller also weighs what rounds gave."""
    from onspec.actors.config import SpeculationConfig
    from onspec.actors.draft_control import DraftController

    ctl = DraftController(SpeculationConfig(probe_interval=2, probe_interval_max=8))
    ctl.verify_cost, ctl.draft_cost, ctl.alpha = [1.0, 1.05, 1.1, 1.15, 1.2], 0.1, 0.8
    assert ctl.draft_cap() > 0  # predicted from alpha: drafting pays
    ctl.observe_round("none", 1, 1.0)
    ctl.observe_round("model", 1.1, 1.6)  # what model rounds really gave: 1.1 tokens for 1.6 plain rounds' time
    assert ctl.model_speedup() < 1.0
    caps = []
    for _ in range(30):
        caps.append(ctl.draft_cap())
        if caps[-1]:
            ctl.observe_round("model", 1, 1.6)  # the probe loses too
    assert set(caps) == {0, 1} and caps.count(1) <= 5 and ctl.probe_interval == 8  # probes, ever fewer (2, 4, 8)
    ctl.reset()  # a new drafter: tried afresh
    assert ctl.draft_cap() > 0


def test_a_rounds_observed_time_leaves_out_the_drafters_catch_up():
    """Reading a long backlog (a prompt, or the tokens of rounds that did not draft) is not a model round's
    cost: charged to a probe after a gap, it made every probe look slow, probes grew rarer and the next
    catch-up longer, and a drafter that paid at k = 1 went unused (BENCHMARKS.md, sixth session)."""
    import time

    eng = tiny_engine(drafter_layers=1, mode="fixed", fixed_k=1)
    forward = eng._drafter_forward

    def slow_backlog(x, *a, **kw):
        if x.shape[1] > 8:  # the catch-up read: made slow, so that it would dominate a round charged with it
            time.sleep(0.3)
        return forward(x, *a, **kw)

    seen = []
    observe = eng.controller.observe_round
    eng._drafter_forward = slow_backlog
    eng.controller.observe_round = lambda src, tokens, secs: (seen.append((src, secs)), observe(src, tokens, secs))
    eng.generate(list(range(1, 31)), SamplingParams(max_tokens=4), speculate=True)
    model = [secs for src, secs in seen if src == "model"]
    assert model and max(model) < 0.25


def test_request_errors():
    eng = tiny_engine()
    with pytest.raises(RequestError, match="empty"):
        eng.generate([], SamplingParams())
    with pytest.raises(RequestError, match="context length"):
        eng.generate(list(range(5)) * 60, SamplingParams())
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)):
        with pytest.raises(RequestError):
            eng.generate([1, 2], SamplingParams(**bad))


def test_generation_stops_at_the_context_length():
    eng = tiny_engine()
    g = eng.generate([i % 90 + 1 for i in range(250)], SamplingParams(max_tokens=100))
    assert len(g.token_ids) == 6 and g.stats.finish_reason == "length"


def test_generation_stops_at_a_stop_token():
    eng = tiny_engine(drafter_layers=3, mode="fixed", fixed_k=4)
    ref = eng.generate([5, 9, 13], SamplingParams(max_tokens=30), speculate=False).token_ids
    stop = ref[10]
    eng.stop_ids = {stop}
    g = eng.generate([5, 9, 13], SamplingParams(max_tokens=30), speculate=True)
    assert g.token_ids == ref[:ref.index(stop) + 1] and g.stats.finish_reason == "stop"


def test_round_observer_sees_each_rejection_with_the_targets_choice():
    eng = tiny_engine(drafter_layers=1, mode="fixed", fixed_k=3)
    torch.manual_seed(0)
    with torch.no_grad():  # a drafter that is right only sometimes
        eng.drafter.head.weight.add_(torch.randn_like(eng.drafter.head.weight) * 4.0)
    records = []
    eng.round_observer = records.append
    eng.record_topk = 4
    prompt = [5, 9, 13]
    g = eng.generate(prompt, SamplingParams(max_tokens=20))
    assert records and len(records) <= g.stats.target_forwards
    full = prompt + g.token_ids
    for r in records:
        assert r.accepted < len(r.drafts) and r.drafter_version == "base"
        # Short sequences: the whole context is kept, so it is a prefix of the output, the accepted drafts
        # follow it and then the target's own token.
        pos = len(r.context)
        assert full[:pos] == r.context
        assert full[pos:pos + r.accepted] == r.drafts[:r.accepted]
        if pos + r.accepted < len(full):
            assert full[pos + r.accepted] == r.target_token != r.drafts[r.accepted]
        assert r.topk_ids[0] == r.target_token and len(r.topk_logprobs) == 4


def test_coverage_records_reach_the_observer_when_nothing_is_drafted():
    """A drafter too poor to use means no drafts and so no rejections: coverage records still carry the text."""
    from onspec.actors.windows import window_from_record

    eng = tiny_engine()
    eng.record_coverage = 10
    seen = []
    eng.round_observer = seen.append
    g = eng.generate([1, 2, 3], SamplingParams(max_tokens=35), speculate=False)
    # after 10, 20 and 30 tokens (the prefill's token counts toward the first), and the request's tail
    assert len(seen) == 4
    full = [1, 2, 3] + g.token_ids
    assert len(seen[-1].context) + 1 == len(full)  # the last window reaches the last served token
    for rec in seen:
        assert rec.drafts == [] and rec.accepted == 0
        full = [1, 2, 3] + g.token_ids
        assert rec.context[-1] == full[len(rec.context) - 1] and rec.target_token == full[len(rec.context)]
        w = window_from_record({"context": rec.context, "drafts": [], "rejected_pos": 0,
                                "target_token": rec.target_token})
        assert w.rejected_row is None and w.ids == full[:len(rec.context) + 1]


def test_a_drafter_handed_over_mid_request_is_taken_between_rounds():
    eng = tiny_engine(mode="fixed", fixed_k=3)
    other = tiny_engine(drafter_layers=1, mode="fixed", fixed_k=3, seed=0).drafter
    other.version = "other"
    expected = eng.generate([5, 6, 7], SamplingParams(max_tokens=30), speculate=False).token_ids
    stats_versions = []
    out = []
    from onspec.actors.requests import GenerationStats
    stats = GenerationStats()
    for i, chunk in enumerate(eng.stream([5, 6, 7], SamplingParams(max_tokens=30), True, stats)):
        out.extend(chunk)
        stats_versions.append(stats.drafter_version)
        if i == 2:
            eng.swap_drafter(other)
    assert out == expected
    assert eng.drafter is other and eng.swaps == 1 and stats_versions[-1] == "other"


def test_warm_up_calibrates_once_where_the_policy_reads_costs():
    """What a served replica runs before it reports ready (actors/replica.py), so no request waits for it."""
    eng = tiny_engine(mode="adaedl", cost_aware=True)
    assert not eng.calibrated and eng.batch_costs == {}
    eng.warm_up()
    assert eng.calibrated and eng.batch_costs[1] and eng.draft_costs[1] > 0
    costs = dict(eng.batch_costs)
    eng.warm_up()  # measured once
    assert eng.batch_costs == costs
    fixed = tiny_engine(mode="fixed", cost_aware=True)
    fixed.warm_up()
    assert not fixed.calibrated  # fixed drafts read no costs
