"""Distillation losses between the target distribution p and the drafter distribution q.

DistillSpec (Zhou et al. 2023, arXiv 2310.08461, Sec. 3 and Table 1) lists the divergences; forward KL
KL(p || q) = sum_v p(v) (log p(v) - log q(v)) is the soft cross-entropy -sum_v p(v) log q(v) up to the
target's entropy, which has no gradient with respect to the drafter.
"""
from __future__ import annotations

import math

import torch


def sparse_forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_probs: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """FKL with a sparse teacher: -sum_j p_j log q(ids_j) (+ sum_j p_j log p_j), averaged over rows.

    student_logits: [N, V']; teacher_ids: [N, K] indices into V'; teacher_probs: [N, K] summing to <= 1
    (the teacher's top-K mass restricted to the drafter's vocabulary, renormalised by the caller);
    weights: optional [N] per-row weights (normalised to mean 1 over the rows).
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids)
    p = teacher_probs.float()
    per_row = (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1)
    if weights is None:
        return per_row.mean()
    w = weights.float()
    return (per_row * w).sum() / w.sum()


# ---- dense divergences between full distributions ---------------------------------------------------------
# Every function below takes target_logits and draft_logits of shape [..., V] over the same vocabulary and
# returns one value per row ([...]), so the caller decides how rows are weighted and reduced. Logits are
# upcast to float32 and the target is detached: only the drafter learns. Each docstring writes its equation
# out in full instead of citing an equation number, because the numbers were not checked against the papers.
LOSSES = ("fkl", "rkl", "jsd", "tvd", "tvdpp")


def _log_probs(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.log_softmax(target_logits.detach().float(), dim=-1),
            torch.log_softmax(draft_logits.float(), dim=-1))


def _kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """sum_v a(v) (log a(v) - log b(v)) with 0 log 0 = 0, from log-probabilities."""
    a = loga.exp()
    # Where a = 0 both logs may be -inf and their difference NaN; zero it before the product so that
    # neither the value nor the gradient (d/da = log a - log b) picks the NaN up.
    diff = torch.where(a > 0, loga - logb, torch.zeros_like(loga))
    return (a * diff).sum(-1)


def forward_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """FKL (DistillSpec, 2310.08461): KL(p || q) = sum_v p(v) (log p(v) - log q(v)), per row."""
    logp, logq = _log_probs(target_logits, draft_logits)
    return _kl(logp, logq)


def reverse_kl(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """RKL (DistillSpec, 2310.08461): KL(q || p) = sum_v q(v) (log q(v) - log p(v)), per row."""
    logp, logq = _log_probs(target_logits, draft_logits)
    return _kl(logq, logp)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """log m with m = beta p + (1 - beta) q, for 0 < beta < 1, without forming p and q."""
    a = logp + math.log(beta)
    b = logq + math.log1p(-beta)
    # logaddexp's backward is exp(x - out) = NaN when both inputs are -inf (p = q = 0). Such entries are
    # masked out of both KL sums, so any finite stand-in for log m there is fine.
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))


def jsd(target_logits: torch.Tensor, draft_logits: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD (DistillSpec, 2310.08461), per row:

    JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q.

    beta = 0.5 is the symmetric Jensen-Shannon divergence (bounded by ln 2). At beta = 0 or 1 the mixture
    equals q or p and the divergence is identically 0; those endpoints are handled exactly rather than via
    0 * KL, which would be NaN when the other KL is infinite.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must lie in [0, 1], got {beta}")
    logp, logq = _log_probs(target_logits, draft_logits)
    if beta == 0.0:
        return _kl(logq, logq)  # exactly 0, yet attached to the drafter's graph so backward() still works
    if beta == 1.0:
        return _kl(logp, logp) + 0.0 * logq.exp().sum(-1)  # p is detached: borrow q's graph, as above
    logm = _log_mixture(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def tvd(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """TVD (DistillSpec, 2310.08461): TV(p, q) = 1/2 sum_v |p(v) - q(v)| = 1 - sum_v min(p(v), q(v)), per row.

    The second form is one minus the speculative-sampling acceptance probability (2211.17192), which is why
    minimising TVD targets acceptance directly.
    """
    logp, logq = _log_probs(target_logits, draft_logits)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def _policy_gradient_surrogate(logq: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """-sum_v sg(q(v) reward(v)) log q(v): its gradient is -E_{v~q}[reward(v) grad log q(v)], exactly over V."""
    c = (logq.exp() * reward).detach()
    # q = 0 gives c = 0 and log q = -inf; mask so that 0 * -inf does not become NaN.
    return -torch.where(c != 0, c * logq, torch.zeros_like(logq)).sum(-1)


def tvd_gradient_surrogate(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Policy-gradient form of TVD (TVD++ paper, 2403.00858), per row; the value is not TV itself.

    grad TV(p, q_theta) = -E_{v~q}[ r(v) grad log q_theta(v) ],  r(v) = 1[p(v) > q(v)].

    (From d|p - q|/dq = -sign(p - q) = 1 - 2 r wherever p != q, and E_q[grad log q] = 0.) The expectation is
    taken exactly over the vocabulary, so the gradient equals autograd's gradient of tvd() wherever p != q.
    """
    logp, logq = _log_probs(target_logits, draft_logits)
    reward = (logp > logq).float()
    return _policy_gradient_surrogate(logq, reward)


def tvd_plus_plus(target_logits: torch.Tensor, draft_logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """TVD++ (Goel et al., 2403.00858), per row; a surrogate whose gradient, not value, is the point.

    gradient = -E_{v~q}[ r~(v) grad log q_theta(v) ],  r~ = (r - E_q[r]) / (std_q[r] + eps),  r = 1[p > q],

    with no gradient through r~. Choices the paper leaves open, made here: the expectation is exact over the
    vocabulary (no sampling), and r is standardised per row under q itself: E_q[r] = sum_v q r,
    Var_q[r] = sum_v q (r - E_q[r])^2. With the exact expectation the mean term contributes nothing
    (E_q[grad log q] = 0), so each row's gradient is the TVD gradient scaled by 1 / (std_q[r] + eps): rows
    where q puts little mass on under-covered tokens get larger steps. The value, -sum_v sg(q r~) log q, is
    not a divergence: log tvd() alongside it.
    """
    logp, logq = _log_probs(target_logits, draft_logits)
    q = logq.exp().detach()
    reward = (logp > logq).float()
    mean = (q * reward).sum(-1, keepdim=True)
    std = (q * (reward - mean) ** 2).sum(-1, keepdim=True).sqrt()
    return _policy_gradient_surrogate(logq, (reward - mean) / (std + eps))


def divergence(name: str, target_logits: torch.Tensor, draft_logits: torch.Tensor,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row loss named by one of LOSSES; beta is used by "jsd" only."""
    if name == "fkl":
        return forward_kl(target_logits, draft_logits)
    if name == "rkl":
        return reverse_kl(target_logits, draft_logits)
    if name == "jsd":
        return jsd(target_logits, draft_logits, beta)
    if name == "tvd":
        return tvd(target_logits, draft_logits)
    if name == "tvdpp":
        return tvd_plus_plus(target_logits, draft_logits)
    raise ValueError(f"unknown divergence {name!r}; valid choices: {', '.join(LOSSES)}")
