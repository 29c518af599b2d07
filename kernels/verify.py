"""Verification of a block of draft tokens against one target forward pass.

Notation as in Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023 (arXiv 2302.01318): k draft
tokens x_1..x_k drawn from the drafter q, target distributions p_1..p_{k+1} from one forward over
[last token, x_1..x_k]; row i of ``p`` predicts the token at draft position i, row k is the bonus position.

Both functions return ``(n_accepted, next_token)`` as 0-dim tensors so the caller chooses when to sync.
"""
from __future__ import annotations

import torch


def greedy_verify(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rule: accept x_i while x_i == argmax p_i; the next token is argmax p at the first mismatch
    (or the bonus row k when all k match). Output equals greedy decoding of the target alone.

    draft: [k] token ids; target_logits: [k+1, V].
    """
    choice = target_logits.argmax(dim=-1)                       # [k+1]
    k = draft.shape[0]
    match = (choice[:k] == draft).to(torch.int64)
    n = torch.cumprod(match, dim=0).sum() if k else torch.zeros((), dtype=torch.int64, device=choice.device)
    return n, choice[n]


def rejection_verify(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection n, sample the next token
    from the residual norm(max(0, p_n - q_n)); if all k are accepted, sample the bonus token from p_{k+1}.
    The emitted tokens are then distributed exactly as p.

    draft: [k]; q: [k, V] (the distributions the drafts were sampled from); p: [k+1, V].
    """
    k = draft.shape[0]
    if k == 0:
        return (torch.zeros((), dtype=torch.int64, device=p.device),
                torch.multinomial(p[0], 1, generator=generator)[0])
    idx = torch.arange(k, device=p.device)
    p_x = p[idx, draft]
    q_x = q[idx, draft]
    u = torch.rand(k, generator=generator, device=p.device)
    accept = (u * q_x <= p_x).to(torch.int64)                  # u < p/q without dividing by q
    n = torch.cumprod(accept, dim=0).sum()
    # Residual at the rejected row; the bonus row has no draft, so its "q" is zero and the residual is p.
    q_pad = torch.cat([q, torch.zeros_like(q[:1])], dim=0)
    residual = (p[n] - q_pad[n]).clamp_min(0.0)
    mass = residual.sum()
    # p == q at the rejected row has probability zero; guard the division anyway.
    dist = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[n])
    return n, torch.multinomial(dist, 1, generator=generator)[0]


def coupled_verify(draft: torch.Tensor, p: torch.Tensor, gumbel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling with noise fixed per position (seeded requests).

    Each position's token is x*_i = argmax_v (log p_i(v) + G_i(v)), which is distributed as p_i (Gumbel-max
    trick); accept x_i while x_i == x*_i and emit x*_n at the first mismatch (or the bonus row). Every emitted
    token is the one the target alone would sample with the same noise, so a seeded output is identical token
    for token to target-only decoding, whatever was drafted. The price: a drafter sampling with the same
    noise is accepted with P(argmax(log q + G) == argmax(log p + G)) <= 1 - TV(p, q), the rejection rule's
    rate; for a deterministic (one-hot) draft both rules accept with p(x).

    draft: [k]; p: [k+1, V]; gumbel: [k+1, V] (``position_gumbel`` for the k+1 positions).
    """
    # The greedy rule over the perturbed scores log p + G (whose argmax is gumbel_argmax's choice).
    return greedy_verify(draft, torch.log(p) + gumbel)
