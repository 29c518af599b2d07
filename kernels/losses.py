"""Distillation losses between the target distribution p and the drafter distribution q.

DistillSpec (Zhou et al. 2023, arXiv 2310.08461, Sec. 3 and Table 1) lists the divergences; forward KL
KL(p || q) = sum_v p(v) (log p(v) - log q(v)) is the soft cross-entropy -sum_v p(v) log q(v) up to the
target's entropy, which has no gradient with respect to the drafter.
"""
from __future__ import annotations

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
