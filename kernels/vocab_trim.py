"""VocabTrim: a drafter head over only the N most frequently generated target tokens.

The drafter's LM head dominates a small drafter's cost (|V| x d). Keeping N << |V| rows makes drafting cheap;
verification stays over the full vocabulary, so exactness is untouched: tokens outside the kept set simply have
drafter probability q(v) = 0, and speculative sampling's residual max(0, p - q) covers them.
"""
from __future__ import annotations

import torch


def select_kept_ids(counts: torch.Tensor, n_keep: int, always: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """The N ids to keep: ``always`` (e.g. EOS), then ids by descending count, ties and unseen ids broken by
    ascending id (BPE ids roughly follow merge order, a frequency prior). Returned sorted ascending.

    counts: [V] token counts over text the target generated.
    """
    vocab = counts.shape[0]
    n_keep = min(n_keep, vocab)
    ids = torch.arange(vocab)
    # Stable sort by (-count, id): a lexsort via one combined key.
    key = -counts.to(torch.float64) * vocab + ids.to(torch.float64)
    order = torch.argsort(key)
    forced = torch.tensor(sorted(set(int(a) for a in always)), dtype=torch.long)
    rest = order[~torch.isin(order, forced)]
    kept = torch.cat([forced, rest])[:n_keep]
    return torch.sort(kept).values


def to_full_ids(trimmed_ids: torch.Tensor, kept_ids: torch.Tensor) -> torch.Tensor:
    """Map ids in the trimmed head (0..N-1) back to full-vocabulary ids."""
    return kept_ids[trimmed_ids]


def to_full_logits(trimmed_logits: torch.Tensor, kept_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scatter trimmed logits [..., N] into a full-vocabulary tensor [..., V] with -inf elsewhere, so that
    softmax gives q(v) = 0 for every dropped token."""
    shape = trimmed_logits.shape[:-1] + (vocab_size,)
    full = torch.full(shape, float("-inf"), dtype=trimmed_logits.dtype, device=trimmed_logits.device)
    full[..., kept_ids] = trimmed_logits
    return full
