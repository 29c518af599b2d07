"""OpenAI / vLLM sampling controls (penalties, logit_bias, min_tokens, ignore_eos, top_k, min_p): the kernels
against loops, and the engine's speculative output against target-only decoding under each control.

The controls transform the target's p at every verified position (with the drafts before it counted as
output), so speculation must give what target-only decoding gives under the same controls: token for token
when greedy or seeded, by distribution otherwise. Each engine test also checks that its control changes the
output, so that a control the engine dropped would fail it."""
import math

import pytest
import torch

from onspec.actors.engine import SpeculativeEngine
from onspec.actors.requests import RequestError, SamplingParams
from onspec.actors.models import derive_drafter
from onspec.actors.config import SpeculationConfig
from onspec.kernels.logits_processors import output_counts, process_logits
from onspec.kernels.sampling import logits_to_probs
from tests.conftest import WordTokenizer, tiny_target
from tests.test_batching import _run

PROMPTS = [[5, 9, 13], [40, 41, 40, 41, 40]]


def controls_engine(k=3, stop_ids=()):
    """A tiny engine whose target is less sure of itself than conftest's (its final norm scaled down): the
    conftest target repeats its last token by a margin no OpenAI-range penalty overcomes. The drafter keeps 80
    of the 96 tokens, so the drafter's trimmed head goes through the controls too."""
    target = tiny_target()
    with torch.no_grad():
        target.model.norm.weight.mul_(0.15)
    drafter = derive_drafter(target, 3, 80, counts=torch.arange(96, 0, -1).double())
    return SpeculativeEngine(target, WordTokenizer(), drafter, SpeculationConfig(mode="fixed", fixed_k=k),
                             max_context=256, stop_ids=set(stop_ids))


# ---- kernels ---------------------------------------------------------------------------------------------------
def reference(logits, prompt, output, drafts, f, pr, r, bias, stops, min_tokens):
    """The controls one position and one token at a time, vLLM's order."""
    out = logits.clone()
    for j in range(logits.shape[0]):
        hist = output + drafts[:j]
        for v in range(logits.shape[1]):
            x = float(out[j, v])
            if v in stops and len(output) + j < min_tokens:
                x = float("-inf")
            x += bias.get(v, 0.0)
            if v in prompt or v in hist:
                x = x / r if x > 0 else x * r
            c = hist.count(v)
            out[j, v] = x - c * f - (c > 0) * pr
    return out


@pytest.mark.parametrize("f,pr,r", [(0.7, 0.0, 1.0), (0.0, -1.2, 1.0), (0.0, 0.0, 1.7), (-0.4, 0.9, 0.6)])
def test_process_logits_matches_a_loop_position_by_position(f, pr, r):
    torch.manual_seed(0)
    V, P = 12, 4
    logits = torch.randn(P, V) * 3
    prompt, output, drafts = [1, 2, 2], [3, 3, 5], [5, 7, 3]
    bias, stops = {4: 2.5, 7: -30.0}, [0, 9]
    for min_tokens in (0, 5, 9):  # none, the first two positions, all positions
        want = reference(logits, prompt, output, drafts, f, pr, r, bias, stops, min_tokens)
        dense = torch.zeros(V)
        dense[list(bias)] = torch.tensor(list(bias.values()))
        got = process_logits(logits, torch.tensor(prompt), torch.tensor(output), torch.tensor(drafts),
                             frequency_penalty=f, presence_penalty=pr, repetition_penalty=r, logit_bias=dense,
                             stop_ids=torch.tensor(stops), min_tokens=min_tokens)
        assert torch.allclose(got, want, atol=1e-5), min_tokens


def test_output_counts_add_the_drafts_before_each_position():
    c = output_counts(torch.tensor([2, 2, 0]), torch.tensor([2, 1, 4]), 3, 5)
    assert c.tolist() == [[1, 0, 2, 0, 0], [1, 0, 3, 0, 0], [1, 1, 3, 0, 0]]  # drafts[2] is behind no position


def test_min_p_keeps_tokens_within_a_fraction_of_the_likeliest():
    torch.manual_seed(1)
    logits = torch.randn(3, 30) * 2
    for T, min_p in ((1.0, 0.1), (0.7, 0.3), (1.5, 0.05)):
        base = torch.softmax(logits / T, -1)
        keep = base >= min_p * base.max(-1, keepdim=True).values
        want = base * keep / (base * keep).sum(-1, keepdim=True)
        assert torch.allclose(logits_to_probs(logits, T, min_p=min_p), want, atol=1e-6)
    # with top-k: vLLM's order (min-p first; the two commute, top-p after them)
    got = logits_to_probs(logits, 1.0, top_k=3, min_p=0.2)
    assert ((got > 0).sum(-1) <= 3).all()


# ---- the engine: speculation equals target-only decoding ----------------------------------------------------
GREEDY_CONTROLS = {
    "frequency": dict(frequency_penalty=0.5),
    "presence": dict(presence_penalty=2.0),
    "repetition": dict(repetition_penalty=6.0),
    "logit_bias": dict(logit_bias={7: 4.0, 13: -100.0}),
    "min_tokens": dict(min_tokens=6),
    "ignore_eos": dict(ignore_eos=True),
    "combined": dict(frequency_penalty=0.3, presence_penalty=0.5, repetition_penalty=1.5,
                     logit_bias={90: 1.0}, min_tokens=4),
}


@pytest.mark.parametrize("name", list(GREEDY_CONTROLS))
def test_greedy_speculation_equals_target_alone_under_each_control(name):
    # 13 and 40 (what the prompts' plain greedy outputs repeat) end a request: min_tokens and ignore_eos act
    eng = controls_engine(stop_ids={13, 40} if name in ("min_tokens", "ignore_eos", "combined") else ())
    changed = drafted = accepted = 0
    for prompt in PROMPTS:
        plain = eng.generate(prompt, SamplingParams(max_tokens=16), speculate=False).token_ids
        params = SamplingParams(max_tokens=16, **GREEDY_CONTROLS[name])
        alone = eng.generate(prompt, params, speculate=False)
        spec = eng.generate(prompt, params, speculate=True)
        assert spec.token_ids == alone.token_ids, prompt
        changed += alone.token_ids != plain
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
        if name == "min_tokens":
            assert len(alone.token_ids) >= 6 and not {13, 40} & set(alone.token_ids[:6])
        if name == "ignore_eos":
            assert len(alone.token_ids) == 16 and alone.stats.finish_reason == "length"
    assert changed, "the control did not change the output"
    assert accepted > 0 and drafted > 0  # drafts were really verified, and accepted


SAMPLED_CONTROLS = {
    "frequency+presence": dict(frequency_penalty=1.0, presence_penalty=1.0),
    "repetition": dict(repetition_penalty=3.0),
    "top_k": dict(top_k=2),
    "min_p": dict(min_p=0.3),
    "combined": dict(top_k=5, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5, logit_bias={60: 2.0}),
}


@pytest.mark.parametrize("name", list(SAMPLED_CONTROLS))
def test_seeded_sampling_under_each_control_equals_target_alone(name):
    """Seeded: each position's token comes from noise fixed by (seed, position) (coupled_verify) applied to
    the processed p, so the output is target-only sampling's whatever was drafted."""
    eng = controls_engine()
    changed = accepted = 0
    for seed in range(3):
        prompt = PROMPTS[seed % 2]
        base = dict(max_tokens=12, temperature=1.2, seed=seed)
        plain = eng.generate(prompt, SamplingParams(**base), speculate=False).token_ids
        params = SamplingParams(**base, **SAMPLED_CONTROLS[name])
        alone = eng.generate(prompt, params, speculate=False).token_ids
        spec = eng.generate(prompt, params, speculate=True)
        assert spec.token_ids == alone, seed
        changed += alone != plain
        accepted += spec.stats.accepted
    assert changed and accepted


def test_unseeded_sampling_under_a_penalty_has_the_target_alone_distribution(monkeypatch):
    """Unseeded requests go through the rejection rule with processed p and q. Three tokens: the third's
    position sees the second as a draft of the same round, so the penalty's per-position counts matter. The
    settings keep the support small (about 16 outcomes, the likeliest at ~3/4) so that 400 runs resolve it."""
    eng = controls_engine(k=2)
    runs = 400
    params = dict(max_tokens=3, temperature=0.3, presence_penalty=0.8, min_p=0.15)

    def histogram(speculate, offset, **extra):
        h = {}
        seeds = iter(range(offset, offset + runs))
        monkeypatch.setattr(torch, "seed", lambda: next(seeds))  # reproducible runs
        for _ in range(runs):
            ids = eng.generate([5, 9], SamplingParams(**{**params, **extra}), speculate=speculate).token_ids
            h[tuple(ids)] = h.get(tuple(ids), 0) + 1
        return h

    def tvd(a, b):
        return 0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b)) / runs

    ref, spec = histogram(False, 0), histogram(True, 10**6)
    # Two independent histograms of n runs differ in each cell by about N(0, 2 p / n): E|.| = sqrt(4p / (pi n)),
    # so E[TVD] ~ sum_k sqrt(p_k / (pi n)). Twice that is a margin sampling noise rarely crosses.
    expected = sum(math.sqrt(c / runs / (math.pi * runs)) for c in ref.values())
    assert tvd(ref, spec) < 2 * expected, (tvd(ref, spec), expected)
    assert eng.controller.alpha > 0  # drafts were accepted along the way
    # ...and the test can tell: without the penalty (almost always 9, 9, 9 then) it is far off
    assert tvd(ref, histogram(False, 2 * 10**6, presence_penalty=0.0)) > 2 * expected


def test_a_batch_gives_each_controlled_request_what_it_gets_alone():
    eng = controls_engine(stop_ids={40})
    jobs = [([5, 9, 13], SamplingParams(max_tokens=14, frequency_penalty=0.5), True),
            ([40, 41, 40, 41, 40], SamplingParams(max_tokens=14, repetition_penalty=6.0, min_tokens=5), True),
            ([1, 2, 3], SamplingParams(max_tokens=14, temperature=1.0, seed=7, min_p=0.2, presence_penalty=1.0),
             True),
            ([77, 5], SamplingParams(max_tokens=14, ignore_eos=True, logit_bias={40: 3.0}), True),
            ([5, 9, 13], SamplingParams(max_tokens=14), True)]
    alone = [eng.generate(p, params, speculate=False).token_ids for p, params, _ in jobs]
    got, widest = _run(eng, jobs)
    assert got == alone and widest >= 3


def test_a_resumed_request_counts_its_earlier_output_as_output():
    """A replica resuming another's stream submits prompt + what was streamed (``resumed``): the penalties
    must count those tokens as output, and min_tokens / max_tokens count what is left."""
    eng = controls_engine(stop_ids={13})
    prompt = [5, 9, 13]
    whole = eng.generate(prompt, SamplingParams(max_tokens=16, frequency_penalty=0.5, min_tokens=8)).token_ids
    seq = eng.submit(prompt + whole[:5], SamplingParams(max_tokens=11, frequency_penalty=0.5, min_tokens=3),
                     resumed=5)
    rest = []
    while not seq.finished:
        eng.step()
        rest += seq.new
    assert rest == whole[5:]


def test_a_default_request_never_processes_logits(monkeypatch):
    import onspec.actors.engine as engine_module

    eng = controls_engine(stop_ids={13})
    calls = []
    real = engine_module.process_logits
    monkeypatch.setattr(engine_module, "process_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    eng.generate([1, 2, 3], SamplingParams(max_tokens=12))
    eng.generate([1, 2, 3], SamplingParams(max_tokens=12, temperature=1.0, seed=1, top_k=5, min_p=0.1))
    assert not calls
    g = eng.generate([1, 2, 3], SamplingParams(max_tokens=12, min_tokens=2), speculate=False)
    assert 0 < len(calls) <= 2 < g.stats.target_forwards  # min_tokens lapses once met


@pytest.mark.parametrize("bad,field", [
    (dict(frequency_penalty=2.5), "frequency_penalty"), (dict(presence_penalty=-3), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={3: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={96: 1.0}), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(min_p=1.5), "min_p")])
def test_out_of_range_controls_are_refused_by_name(bad, field):
    eng = controls_engine()
    with pytest.raises(RequestError, match=field):
        eng.submit([1, 2], SamplingParams(**bad))
