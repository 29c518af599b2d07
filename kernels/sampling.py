"""Turning logits into the distribution that is actually sampled.

The same transform is applied to the target's logits (p) and the drafter's (q): speculative sampling is
lossless with respect to whatever distribution p denotes, so p must be the *processed* target distribution
(temperature, top-k, top-p) and q the distribution the draft tokens were really drawn from.
"""
from __future__ import annotations

import torch


def is_greedy(temperature: float) -> bool:
    return temperature <= 0.0


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-k tokens and then to the smallest nucleus of mass >= top_p
    (Holtzman et al. 2019, eq. 3), renormalised. Works on the last dimension of any shape."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy decoding for T == 0")
    logits = logits.float() / temperature
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
