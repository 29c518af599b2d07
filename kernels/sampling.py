"""Turning logits into the distribution that is actually sampled.

The same transform is applied to the target's logits (p) and the drafter's (q): speculative sampling is
lossless with respect to whatever distribution p denotes, so p must be the *processed* target distribution
(temperature, min-p, top-k, top-p) and q the distribution the draft tokens were really drawn from.
"""
from __future__ import annotations

import math

import torch


def is_greedy(temperature: float) -> bool:
    return temperature <= 0.0


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """softmax(logits / T) restricted to the tokens with p(v) >= min_p * max p (min-p sampling, Nguyen et al.
    2024, "Turning Up the Heat", sec. 3), then to the top-k tokens, then to the smallest nucleus of mass >= top_p
    (Holtzman et al. 2019, eq. 3), renormalised; vLLM's order. Works on the last dimension of any shape."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy decoding for T == 0")
    logits = logits.float() / temperature
    if min_p > 0.0:
        # p(v) / max p = exp(l_v - max l): the threshold in logit space needs no softmax
        logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + math.log(min_p), float("-inf"))
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token if the mass strictly before it is < top_p: the first token is always kept.
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H = -sum_v p(v) log p(v) in nats over the last dimension (0 log 0 = 0)."""
    logp = torch.log(probs.clamp_min(1e-30))
    return -(probs * logp).sum(dim=-1)


def position_gumbel(seed: int, positions: range, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise G = -log(-log U), U ~ Uniform(0, 1), of shape [len(positions), vocab], each row a
    pure function of (seed, position): the same request asks for the same position's noise however its
    tokens were drafted, so a seeded output does not depend on the drafts (see ``coupled_verify``)."""
    rows = []
    for pos in positions:
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + pos) % (2**63))
        rows.append(torch.rand(vocab, generator=g, device=device))
    u = torch.stack(rows) if rows else torch.empty(0, vocab, device=device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def gumbel_argmax(probs: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max trick: argmax_v (log p(v) + G_v) is distributed as p for i.i.d. standard Gumbel G
    (Gumbel 1954; Maddison et al. 2014, eq. 1). Tokens with p = 0 (cut by top-k / top-p) are never chosen."""
    return (torch.log(probs) + gumbel).argmax(dim=-1)
