"""How many tokens to draft: AdaEDL's entropy stop inside a round, and a cost model across rounds.

AdaEDL (Agrawal, Jeon, Lee 2024, arXiv 2410.18351): the drafter's entropy H bounds the acceptance probability
of its next token from below, LB = 1 - sqrt(gamma * H); drafting stops once LB < lambda, and lambda adapts to
the observed acceptance rate after every round.

The cost model (Leviathan et al. 2023, arXiv 2211.17192, eq. 1 and Theorem 3.8) decides the longest draft worth
trying: with per-token acceptance alpha, a round of k drafts yields E[tokens] = (1 - alpha^(k+1)) / (1 - alpha)
and costs k * c_draft + T_verify(k + 1). When no k > 0 beats plain decoding (k = 0: one token for T_verify(1)),
the engine stops drafting, so a poor drafter cannot make decoding slower.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def adaedl_lower_bound(entropy: float, gamma: float) -> float:
    """AdaEDL eq. (lower bound on acceptance): LB = 1 - sqrt(gamma * H), H in nats."""
    return 1.0 - math.sqrt(max(gamma * entropy, 0.0))


def adaedl_should_stop(entropy: float, gamma: float, lam: float) -> bool:
    """Stop drafting before proposing a token whose acceptance lower bound is under the threshold lambda."""
    return adaedl_lower_bound(entropy, gamma) < lam


@dataclass
class AdaEDLState:
    """The adaptive threshold of AdaEDL (its Algorithm 1): an EMA of the acceptance rate AR and lambda."""
    lam: float = 0.3
    acceptance: float = 0.5
    beta1: float = 0.5      # EMA weight of AR
    beta2: float = 0.9      # EMA weight of lambda
    eps: float = 0.01       # step of lambda
    target: float = 0.9     # alpha in the paper: raise lambda while AR is under it
    lam_min: float = 0.0
    lam_max: float = 0.95


def adaedl_update(state: AdaEDLState, drafted: int, accepted: int, max_draft: int) -> AdaEDLState:
    """After a round with n_d drafted and n_a accepted out of a maximum L:
    AR <- b1 AR + (1 - b1) n_a / n_d;  lambda' = lambda + eps if AR < alpha, lambda - eps if n_a != L, else
    lambda;  lambda <- b2 lambda + (1 - b2) lambda'. Rounds that drafted nothing leave the state unchanged."""
    if drafted <= 0:
        return state
    ar = state.beta1 * state.acceptance + (1 - state.beta1) * accepted / drafted
    if ar < state.target:
        proposal = state.lam + state.eps
    elif accepted != max_draft:
        proposal = state.lam - state.eps
    else:
        proposal = state.lam
    lam = state.beta2 * state.lam + (1 - state.beta2) * proposal
    lam = min(max(lam, state.lam_min), state.lam_max)
    return AdaEDLState(lam, ar, state.beta1, state.beta2, state.eps, state.target, state.lam_min, state.lam_max)


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens emitted by one verification round with k drafts and i.i.d. acceptance alpha
    (Leviathan et al. eq. 1): (1 - alpha^(k+1)) / (1 - alpha); k + 1 when alpha == 1."""
    alpha = min(max(alpha, 0.0), 1.0)
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_draft_length(alpha: float, draft_cost: float, verify_cost: list[float], max_draft: int) -> tuple[int, float]:
    """argmax_k E[tokens](alpha, k) / (k * draft_cost + verify_cost[k]) over k = 0..max_draft.

    verify_cost[n - 1] is the time of one target forward over n tokens (so verify_cost[0] is plain decoding).
    Returns (k, predicted speedup over plain decoding)."""
    base = 1.0 / verify_cost[0]
    best_k, best_rate = 0, base
    for k in range(1, min(max_draft, len(verify_cost) - 1) + 1):
        rate = expected_tokens(alpha, k) / (k * draft_cost + verify_cost[k])
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate / base


def best_batch_width(gains: list[list[float]], verify_cost: list[float], draft_cost: list[float]) -> int:
    """The token width W of a batched verification round: argmax_W sum_r gains[r][min(W - 1, len(gains[r]) - 1)]
    / (verify_cost[W - 1] + draft_cost[W - 1]) over W = 1..len(verify_cost).

    Every row of the batch pays for W positions (rows are padded to the longest draft), so a row's draft is worth
    its length only when the batch's accepted tokens per second grow with it: Leviathan et al.'s eq. 1 summed over
    the rows, with the round's cost measured by (rows, width). ``gains[r][d]``: the tokens row r is expected to
    emit with its draft cut to d tokens (gains[r][0] = 1, the target's own token); ``verify_cost[W - 1]``: the
    target forward over all rows at width W; ``draft_cost[W - 1]``: the drafting that width needs."""
    best_w, best_rate = 1, -1.0
    for w in range(1, len(verify_cost) + 1):
        tokens = sum(g[min(w - 1, len(g) - 1)] for g in gains)
        rate = tokens / (verify_cost[w - 1] + draft_cost[w - 1])
        if rate > best_rate:
            best_w, best_rate = w, rate
    return best_w
