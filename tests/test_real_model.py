"""The engine on the real SmolLM2-135M-Instruct target."""
import pytest

from onspec.actors.requests import SamplingParams
from onspec.actors.models import derive_drafter

pytestmark = pytest.mark.real_model

CHATS = [
    [{"role": "user", "content": "Write a Python function that returns the square of a number."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
]
RAW = "The three primary colours are"


@pytest.fixture(scope="module")
def prompts(real_engine):
    return [real_engine.encode(messages=m) for m in CHATS] + [real_engine.encode(RAW)]


@pytest.fixture(scope="module")
def references(real_engine, prompts):
    return [real_engine.generate(p, SamplingParams(max_tokens=40), speculate=False).token_ids for p in prompts]


@pytest.fixture(scope="module")
def deep_drafter(real_engine):
    # All 30 layers and the full vocabulary: the target itself run token by token as a drafter, accepted
    # nearly always, so the accept and bonus paths run on every round (an early exit, even at 24 of 30
    # layers, is accepted only ~12% of the time on this model).
    t = real_engine.target
    return derive_drafter(t, t.config.num_hidden_layers, t.config.vocab_size)


def _check(engine, prompts, references, mode, max_tokens, source="model"):
    engine.spec.mode = mode
    old_source, engine.spec.source = engine.spec.source, source
    engine.controller.reset()
    drafted = accepted = 0
    try:
        for p, ref in zip(prompts, references):
            g = engine.generate(p, SamplingParams(max_tokens=max_tokens), speculate=True)
            assert g.token_ids == ref[:max_tokens]
            drafted, accepted = drafted + g.stats.drafted, accepted + g.stats.accepted
    finally:
        engine.spec.source = old_source
    return drafted, accepted


@pytest.mark.parametrize("mode", ["fixed", "adaedl"])
def test_greedy_identity_default_drafter(real_engine, prompts, references, mode):
    drafted, _ = _check(real_engine, prompts, references, mode, 40)
    assert drafted > 0


@pytest.mark.parametrize("mode,max_tokens", [("fixed", 40), ("adaedl", 40), ("fixed", 13)])
def test_greedy_identity_strong_drafter(real_engine, prompts, references, deep_drafter, mode, max_tokens):
    default, dtype = real_engine.drafter, real_engine.drafter_dtype
    real_engine.drafter_dtype = "float32"  # the target's own layers, unrounded: it agrees with the target
    real_engine.set_drafter(deep_drafter)
    try:
        drafted, accepted = _check(real_engine, prompts, references, mode, max_tokens)
    finally:
        real_engine.drafter_dtype = dtype
        real_engine.set_drafter(default)
    # fp32 layers against the served 4-bit target: they disagree on a few tokens in a hundred
    assert accepted >= 0.85 * drafted > 0


def test_default_drafter_shares_tokenizer_and_trims_vocab(real_engine):
    d = real_engine.drafter
    assert d.kind == "feature" and d.layers == 1  # the default kind (BENCHMARKS.md: "which should be the default")
    assert d.full_vocab == real_engine.target.config.vocab_size
    assert d.kept_ids.numel() == 8192
    assert set(real_engine.stop_ids) <= set(d.kept_ids.tolist())
    assert d.body.embed_tokens is real_engine.target.get_input_embeddings()


def test_greedy_identity_other_drafter_kind(real_engine, prompts, references):
    """Both kinds behind one engine: the default (feature, EAGLE-style: it reads the target's hidden states
    from the verification forwards, and its own predicted ones when drafting ahead) runs in the tests above;
    here the other one. Outputs stay the target's, token for token."""
    from onspec.actors.feature_drafter import derive_feature_drafter
    from onspec.actors.models import derive_drafter

    default = real_engine.drafter
    other = derive_drafter if default.kind == "feature" else derive_feature_drafter
    real_engine.set_drafter(other(real_engine.target, 2 if default.kind == "feature" else 1, 8192))
    assert real_engine.drafter.kind != default.kind
    try:
        drafted, accepted = _check(real_engine, prompts, references, "fixed", 40)
    finally:
        real_engine.set_drafter(default)
    assert accepted > 0 and drafted > accepted  # both the accept and the reject paths ran


def test_greedy_identity_hybrid_source(real_engine, prompts, references):
    drafted, accepted = _check(real_engine, prompts, references, "adaedl", 40, source="hybrid")
    assert drafted >= 0


def test_prompt_scoring_equals_the_targets_own_forward(real_engine):
    """echo + logprobs (evaluation harnesses): each prompt token's log-probability given the ones before it, as
    transformers' forward of the same target computes it; long prompts are scored in chunks. (At int4 the
    bf16 inside the 4-bit matmuls turns the two attention kernels' last-bit differences into ~1e-2 ones, and
    the logits come out in bf16, whose step is 0.06-0.12 at their size: two roundings apart, ~0.25.)"""
    import torch

    ids = real_engine.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")
    with torch.inference_mode():
        ref = torch.log_softmax(real_engine.target(torch.tensor([ids])).logits[0].float(), -1)
    tol = 0.3 if getattr(real_engine.target.model, "exact_attention", False) else 1e-3
    for chunk in (512, 7):
        got = real_engine.prompt_logprobs(ids, 3, chunk=chunk)
        assert got[0] == (None, []) and len(got) == len(ids)
        same_top = 0
        for i in range(1, len(ids)):
            lp, top = got[i]
            assert abs(lp - ref[i - 1, ids[i]].item()) < tol
            same_top += top[0][0] == ref[i - 1].argmax().item()
        assert same_top >= 0.9 * (len(ids) - 1)


def test_a_resumed_request_continues_as_the_first_replica_would_have(real_engine, monkeypatch):
    """A prompt is prefilled in one causal product per chunk (faster, not bitwise single steps); what a resumed
    request had already streamed goes through per query, as it was decoded. So another replica, resuming from the
    streamed tokens, writes the same continuation token for token, speculating or not."""
    calls = []
    plain = type(real_engine)._target_rows

    def rows(self, x, start, lengths, prompt_chunk=False):
        calls.append((x.shape[1], prompt_chunk))
        return plain(self, x, start, lengths, prompt_chunk)

    monkeypatch.setattr(type(real_engine), "_target_rows", rows)
    monkeypatch.setattr(real_engine, "prefill_chunk", 16)  # the prompt in three chunks: flash, then masked
    ids = real_engine.encode(messages=[{"role": "user", "content": "Write a Python function that reverses a list."}])
    assert 32 < len(ids) < 48
    whole = real_engine.generate(ids, SamplingParams(max_tokens=64, temperature=0.0), speculate=False).token_ids
    chunks = [(16, True), (16, True), (len(ids) - 32, True)]
    assert calls[:3] == chunks
    for cut, speculate in ((17, False), (40, True)):
        calls.clear()
        seq = real_engine.submit(ids + whole[:cut], SamplingParams(max_tokens=64 - cut, temperature=0.0),
                                 speculate=speculate, resumed=cut)
        rest = list(seq.new) if seq.new else []
        while not seq.finished:
            real_engine.step()
            rest += seq.new
        # the prompt as before; the streamed part per query, in chunks as any prefill
        assert calls[:3] == chunks and calls[3] == (16, False)
        assert rest == whole[cut:]
