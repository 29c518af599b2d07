"""Dense distillation divergences in onspec.kernels.losses, checked against values worked out by hand."""
import math

import pytest
import torch
from onspec.kernels.losses import (
    LOSSES,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    tvd,
    tvd_gradient_surrogate,
    tvd_plus_plus,
)

INF = float("inf")


def _logits(*probs):
    """One row of logits per probability list; log(0) = -inf marks an impossible token."""
    return torch.log(torch.tensor(probs, dtype=torch.float32))


P2, Q2 = _logits([0.5, 0.5]), _logits([0.9, 0.1])
P3, Q3 = _logits([0.2, 0.3, 0.5]), _logits([0.5, 0.25, 0.25])


# ---- values ----------------------------------------------------------------------------------------------
def test_forward_kl_closed_form():
    assert float(forward_kl(P2, Q2)) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)
    want = 0.2 * math.log(0.2 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.5 * math.log(0.5 / 0.25)
    assert float(forward_kl(P3, Q3)) == pytest.approx(want, rel=1e-5)


def test_reverse_kl_closed_form():
    assert float(reverse_kl(P2, Q2)) == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-5)
    want = 0.5 * math.log(0.5 / 0.2) + 0.25 * math.log(0.25 / 0.3) + 0.25 * math.log(0.25 / 0.5)
    assert float(reverse_kl(P3, Q3)) == pytest.approx(want, rel=1e-5)


def test_jsd_closed_form():
    # beta = 0.5: m = [0.7, 0.3]
    want = (0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
            + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)))
    assert float(jsd(P2, Q2)) == pytest.approx(want, rel=1e-5)
    # beta = 0.25: m = 0.25 p + 0.75 q = [0.8, 0.2]
    want = (0.25 * (0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))
            + 0.75 * (0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)))
    assert float(jsd(P2, Q2, beta=0.25)) == pytest.approx(want, rel=1e-5)


def test_jsd_symmetric_and_bounded_by_ln2():
    torch.manual_seed(0)
    a, b = 3 * torch.randn(16, 9), 3 * torch.randn(16, 9)
    torch.testing.assert_close(jsd(a, b), jsd(b, a))
    assert bool((jsd(a, b) <= math.log(2) + 1e-6).all()) and bool((jsd(a, b) >= 0).all())
    # disjoint supports reach the bound exactly
    assert float(jsd(_logits([1.0, 0.0]), _logits([0.0, 1.0]))) == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_zero_without_nan(beta):
    target = _logits([1.0, 0.0, 0.0], [0.2, 0.3, 0.5])
    draft = torch.tensor([[0.0, 1.0, 2.0], [-INF, 0.0, 1.0]], requires_grad=True)
    out = jsd(target, draft, beta=beta)
    assert out.tolist() == [0.0, 0.0]
    out.sum().backward()
    assert draft.grad is not None and bool(torch.isfinite(draft.grad).all())


def test_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        jsd(P2, Q2, beta=1.5)


def test_tvd_closed_form_and_acceptance():
    # 1/2 (|0.2-0.5| + |0.3-0.25| + |0.5-0.25|) = 0.3 = 1 - (0.2 + 0.25 + 0.25)
    assert float(tvd(P3, Q3)) == pytest.approx(0.3, rel=1e-5)
    assert float(tvd(P2, Q2)) == pytest.approx(0.4, rel=1e-5)
    torch.manual_seed(1)
    a, b = torch.randn(8, 11), torch.randn(8, 11)
    acceptance = torch.minimum(torch.softmax(a, -1), torch.softmax(b, -1)).sum(-1)
    torch.testing.assert_close(tvd(a, b), 1 - acceptance)


@pytest.mark.parametrize("name", LOSSES)
def test_all_zero_when_p_equals_q(name):
    torch.manual_seed(2)
    logits = torch.randn(5, 7)
    assert torch.allclose(divergence(name, logits, logits.clone()), torch.zeros(5), atol=1e-6)
    if name != "tvdpp":
        # A shifted copy is the same distribution up to rounding; tvdpp's value is not a divergence (its
        # reward 1[p > q] flips on rounding noise there), so only the true divergences are checked.
        assert torch.allclose(divergence(name, logits, logits + 3.0), torch.zeros(5), atol=1e-5)


def test_zeros_in_p_give_finite_closed_form_values():
    p = _logits([0.5, 0.5, 0.0])                # -inf logit
    p_soft = torch.tensor([[0.0, 0.0, -1e4]])   # so negative that exp underflows
    q = _logits([0.25, 0.25, 0.5])
    for target in (p, p_soft):
        assert float(forward_kl(target, q)) == pytest.approx(math.log(2), rel=1e-5)
        want = 0.5 * math.log(0.5 / 0.375) + 0.5 * (0.5 * math.log(0.25 / 0.375) + 0.5 * math.log(0.5 / 0.25))
        assert float(jsd(target, q)) == pytest.approx(want, rel=1e-5)
        assert float(tvd(target, q)) == pytest.approx(0.5, rel=1e-5)
    # q puts mass where p has none: RKL is genuinely infinite, never NaN
    assert float(reverse_kl(p, q)) == INF


@pytest.mark.parametrize("name", LOSSES)
def test_shared_zeros_give_finite_values_and_gradients(name):
    target = _logits([0.5, 0.5, 0.0, 0.0])
    draft = _logits([0.25, 0.75, 0.0, 0.0]).requires_grad_(True)
    out = divergence(name, target, draft)
    assert bool(torch.isfinite(out).all())
    out.sum().backward()
    assert bool(torch.isfinite(draft.grad).all())
    if name == "fkl":
        assert out.item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), rel=1e-5)
    if name == "rkl":
        assert out.item() == pytest.approx(0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), rel=1e-5)


# ---- gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_target_gets_no_gradient_and_rows_stay_separate(name):
    torch.manual_seed(3)
    target = torch.randn(4, 6, requires_grad=True)
    draft = torch.randn(4, 6, requires_grad=True)
    out = divergence(name, target, draft)
    assert out.shape == (4,)
    out[1].backward()
    assert target.grad is None
    assert float(draft.grad[[0, 2, 3]].abs().max()) == 0.0


def test_tvd_gradient_surrogate_matches_autograd_of_tvd():
    torch.manual_seed(4)
    target = torch.randn(6, 10)
    draft = torch.randn(6, 10, requires_grad=True)
    (g_tvd,) = torch.autograd.grad(tvd(target, draft).sum(), draft)
    (g_sur,) = torch.autograd.grad(tvd_gradient_surrogate(target, draft).sum(), draft)
    torch.testing.assert_close(g_sur, g_tvd, rtol=1e-5, atol=1e-7)


def test_tvd_plus_plus_gradient_matches_hand_formula():
    torch.manual_seed(5)
    target = torch.randn(6, 10)
    draft = torch.randn(6, 10, requires_grad=True)
    eps = 1e-6
    (got,) = torch.autograd.grad(tvd_plus_plus(target, draft, eps=eps).sum(), draft)
    with torch.no_grad():
        p, q = torch.softmax(target, -1), torch.softmax(draft, -1)
        r = (p > q).float()
        mean = (q * r).sum(-1, keepdim=True)
        std = torch.sqrt((q * (r - mean) ** 2).sum(-1, keepdim=True))
        c = q * (r - mean) / (std + eps)
        # d/dz_j of -sum_v c_v log softmax(z)_v = -c_j + q_j sum_v c_v
        want = -c + q * c.sum(-1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_tvd_plus_plus_is_tvd_gradient_rescaled_per_row():
    torch.manual_seed(6)
    target = torch.randn(5, 8)
    draft = torch.randn(5, 8, requires_grad=True)
    (g_pp,) = torch.autograd.grad(tvd_plus_plus(target, draft, eps=0.0).sum(), draft)
    (g_tvd,) = torch.autograd.grad(tvd(target, draft).sum(), draft)
    with torch.no_grad():
        q = torch.softmax(draft, -1)
        r = (torch.softmax(target, -1) > q).float()
        mean = (q * r).sum(-1, keepdim=True)
        std = torch.sqrt(mean * (1 - mean))  # r is binary, so Var_q[r] = E_q[r] (1 - E_q[r])
    torch.testing.assert_close(g_pp, g_tvd / std, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_sgd_on_each_loss_moves_q_toward_p(name):
    torch.manual_seed(7)
    target = 2 * torch.randn(3, 6)
    draft = torch.zeros(3, 6, requires_grad=True)
    opt = torch.optim.SGD([draft], lr=1.0)
    start = tvd(target, draft).mean().item()
    for _ in range(100):
        opt.zero_grad()
        divergence(name, target, draft).mean().backward()
        opt.step()
    end = tvd(target, draft).mean().item()
    assert end < 0.3 * start, (name, start, end)


# ---- dispatch --------------------------------------------------------------------------------------------
def test_divergence_dispatch_and_unknown_name():
    assert LOSSES == ("fkl", "rkl", "jsd", "tvd", "tvdpp")
    torch.testing.assert_close(divergence("fkl", P3, Q3), forward_kl(P3, Q3))
    torch.testing.assert_close(divergence("rkl", P3, Q3), reverse_kl(P3, Q3))
    torch.testing.assert_close(divergence("jsd", P3, Q3, beta=0.3), jsd(P3, Q3, beta=0.3))
    torch.testing.assert_close(divergence("tvd", P3, Q3), tvd(P3, Q3))
    torch.testing.assert_close(divergence("tvdpp", P3, Q3), tvd_plus_plus(P3, Q3))
    with pytest.raises(ValueError, match="fkl, rkl, jsd, tvd, tvdpp"):
        divergence("kl", P3, Q3)
