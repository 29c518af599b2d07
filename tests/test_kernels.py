import math

import pytest
import torch

from onspec.kernels.draft_length import (AdaEDLState, adaedl_lower_bound, adaedl_should_stop, adaedl_update,
                                         best_draft_length, expected_tokens)
from onspec.kernels.losses import sparse_forward_kl
from onspec.kernels.sampling import entropy, logits_to_probs
from onspec.kernels.verify import greedy_verify, rejection_verify
from onspec.kernels.vocab_trim import select_kept_ids, to_full_ids, to_full_logits


# ---- greedy verification ----------------------------------------------------------------------------------
def _onehot_logits(choices, vocab=8):
    logits = torch.zeros(len(choices), vocab)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


def test_greedy_accepts_all_and_takes_bonus():
    n, tok = greedy_verify(torch.tensor([3, 1, 4]), _onehot_logits([3, 1, 4, 6]))
    assert (int(n), int(tok)) == (3, 6)


def test_greedy_stops_at_first_mismatch_and_corrects():
    n, tok = greedy_verify(torch.tensor([3, 2, 4]), _onehot_logits([3, 1, 4, 6]))
    assert (int(n), int(tok)) == (1, 1)  # a later match (position 2) must not count


def test_greedy_with_no_drafts_is_plain_argmax():
    n, tok = greedy_verify(torch.tensor([], dtype=torch.long), _onehot_logits([5]))
    assert (int(n), int(tok)) == (0, 5)


# ---- speculative sampling ---------------------------------------------------------------------------------
P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
Q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.2, 0.2, 0.2]])
TRIALS = 20000
TOL = 0.015  # ~4 standard errors of a proportion at 20k trials


def _emitted(verify, seed=1234):
    """First and second emitted tokens over many independent rounds with k = 2 drafts."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(4)
    second = torch.zeros(4)
    for _ in range(TRIALS):
        d = torch.stack([torch.multinomial(Q[i], 1, generator=g)[0] for i in range(2)])
        n, tok = verify(d, Q, P, g)
        out = d[:int(n)].tolist() + [int(tok)]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first / first.sum(), second / second.sum()


def test_rejection_sampling_output_distribution_equals_p():
    first, second = _emitted(rejection_verify)
    # The first token is distributed as p_1; given it (the rows here do not depend on the prefix), the
    # second as p_2.
    assert torch.allclose(first, P[0], atol=TOL), first
    assert torch.allclose(second, P[1], atol=TOL), second


def test_the_distribution_test_catches_a_wrong_residual():
    def resample_from_p(d, q, p, g):  # a plausible bug: on rejection sample from p instead of max(0, p - q)
        idx = torch.arange(d.shape[0])
        acc = (torch.rand(d.shape[0], generator=g) * q[idx, d] <= p[idx, d]).long()
        n = int(torch.cumprod(acc, 0).sum())
        return torch.tensor(n), torch.multinomial(p[n], 1, generator=g)[0]

    first, _ = _emitted(resample_from_p)
    assert (first - P[0]).abs().max() > 3 * TOL


def test_rejection_with_zero_drafts_samples_p():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        n, tok = rejection_verify(torch.tensor([], dtype=torch.long), Q[:0], P[:1], g)
        assert int(n) == 0
        counts[int(tok)] += 1
    assert torch.allclose(counts / counts.sum(), P[0], atol=0.03)


def test_coupled_verify_emits_the_noise_choice_whatever_was_drafted():
    from onspec.kernels.sampling import gumbel_argmax, position_gumbel
    from onspec.kernels.verify import coupled_verify

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(5, 12), -1)
    noise = position_gumbel(7, range(10, 15), 12)
    assert torch.equal(noise, position_gumbel(7, range(10, 15), 12))  # a pure function of (seed, position)
    assert torch.equal(noise[2:], position_gumbel(7, range(12, 15), 12))
    want = gumbel_argmax(p, noise).tolist()
    for draft in (want[:4], [(t + 1) % 12 for t in want[:4]], want[:2] + [(want[2] + 1) % 12, want[3]], []):
        n, tok = coupled_verify(torch.tensor(draft, dtype=torch.long), p[:len(draft) + 1], noise[:len(draft) + 1])
        emitted = draft[:int(n)] + [int(tok)]
        assert emitted == want[:len(emitted)], draft
    assert int(coupled_verify(torch.tensor(want[:4]), p, noise)[0]) == 4


def test_gumbel_max_with_position_noise_samples_p():
    from onspec.kernels.sampling import gumbel_argmax, position_gumbel

    p = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])  # a zero: a token cut by top-k/top-p is never chosen
    counts = torch.zeros(5)
    for seed in range(6000):
        counts[int(gumbel_argmax(p, position_gumbel(seed, range(3, 4), 5)[0]))] += 1
    assert counts[1] == 0
    assert torch.allclose(counts / counts.sum(), p, atol=0.025), counts / counts.sum()


def test_logits_to_probs_temperature_topk_topp():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert torch.allclose(logits_to_probs(logits, 1.0), torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=1e-6)
    assert torch.allclose(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)
    # nucleus 0.6: 0.4 then 0.3 reaches 0.7 >= 0.6, so two tokens remain
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.6), torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=1e-6)
    sharp = logits_to_probs(logits, 0.5)
    assert torch.allclose(sharp, torch.tensor([16, 9, 4, 1]) / 30.0, atol=1e-6)
    with pytest.raises(ValueError):
        logits_to_probs(logits, 0.0)


def test_entropy_closed_form():
    assert math.isclose(float(entropy(torch.full((4,), 0.25))), math.log(4), rel_tol=1e-6)
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-6)


# ---- AdaEDL and the cost model ----------------------------------------------------------------------------
def test_adaedl_lower_bound_and_stop():
    assert adaedl_lower_bound(0.0, 0.2) == 1.0
    assert adaedl_lower_bound(1.25, 0.2) == pytest.approx(0.5)        # 1 - sqrt(0.25)
    assert not adaedl_should_stop(1.25, 0.2, 0.4)
    assert adaedl_should_stop(1.25, 0.2, 0.6)


def test_adaedl_threshold_rises_when_acceptance_is_low_and_falls_when_high():
    low = adaedl_update(AdaEDLState(lam=0.3, acceptance=0.5), drafted=4, accepted=0, max_draft=4)
    assert low.acceptance == pytest.approx(0.25)                     # 0.5 * 0.5 + 0.5 * 0
    assert low.lam == pytest.approx(0.9 * 0.3 + 0.1 * 0.31)
    high = adaedl_update(AdaEDLState(lam=0.3, acceptance=1.0), drafted=2, accepted=2, max_draft=4)
    assert high.lam == pytest.approx(0.9 * 0.3 + 0.1 * 0.29)          # AR >= 0.9 and n_a != L: lower
    full = adaedl_update(AdaEDLState(lam=0.3, acceptance=1.0), drafted=4, accepted=4, max_draft=4)
    assert full.lam == pytest.approx(0.3)
    same = adaedl_update(AdaEDLState(lam=0.3), drafted=0, accepted=0, max_draft=4)
    assert same.lam == 0.3


def test_expected_tokens_closed_form():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_cost_model_backs_off_to_plain_decoding():
    verify = [1.0, 1.1, 1.2, 1.3, 1.4]
    assert best_draft_length(0.05, 0.1, verify, 4)[0] == 0     # a poor drafter: do not draft
    k, speedup = best_draft_length(0.9, 0.05, verify, 4)
    assert k == 4 and speedup > 2.5
    assert best_draft_length(0.9, 0.05, [1.0, 5.0, 5.0, 5.0, 5.0], 4)[0] == 0  # verification too dear


# ---- VocabTrim --------------------------------------------------------------------------------------------
def test_select_kept_ids_by_count_then_id_with_forced():
    counts = torch.tensor([0, 5, 0, 9, 1, 0, 0, 0], dtype=torch.float64)
    assert select_kept_ids(counts, 3).tolist() == [1, 3, 4]
    assert select_kept_ids(counts, 3, always=[7]).tolist() == [1, 3, 7]
    assert select_kept_ids(counts, 5).tolist() == [0, 1, 2, 3, 4]  # unseen ids fill by ascending id


def test_vocab_trim_maps_back_and_zeroes_dropped_tokens():
    kept = torch.tensor([2, 5, 7])
    trimmed = torch.tensor([[0.1, 2.0, -1.0]])
    full = to_full_logits(trimmed, kept, 10)
    probs = torch.softmax(full, -1)
    assert probs[0, [0, 1, 3, 4, 6, 8, 9]].sum() == 0
    assert torch.allclose(probs[0, kept], torch.softmax(trimmed, -1)[0])
    assert to_full_ids(trimmed.argmax(-1), kept).tolist() == [5]


# ---- losses -----------------------------------------------------------------------------------------------
def test_sparse_forward_kl_closed_form():
    p = torch.tensor([[0.5, 0.5]])
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = sparse_forward_kl(logits, torch.tensor([[0, 1]]), p)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(sparse_forward_kl(torch.log(p), torch.tensor([[0, 1]]), p)) == pytest.approx(0.0, abs=1e-6)
