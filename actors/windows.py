"""The trainer's training examples: a context window from the rejection stream (or from the drafter's own
continuation), the target's sparse teacher distribution at every position of it, and the replay buffer that
keeps windows for later steps. Imports go kernels <- actors only."""
from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass, field

import torch

@dataclass
class Window:
    """Token ids the target produced (context + accepted drafts + its correction), and what to learn there.

    Row i of the logits predicts ids[i + 1]; ``rejected_row`` predicts the target's correction. Rows before
    ``first_row`` are context only (on-policy windows: the prefix the drafter continued)."""
    ids: list[int]
    rejected_row: int | None
    greedy: bool
    record_id: str | None = None
    label: str = ""
    first_row: int = 0
    teacher: "Teacher | None" = field(default=None, repr=False)
    # A structured request's record (``constrained``): the grammar-masked target's top-k at ``rejected_row``
    # (ids, log-probabilities), the distribution it served there. Only that row is learned from: the record does
    # not hold the grammar's state at the context's positions, where the unmasked target would teach wrongly.
    served: tuple[list[int], list[float]] | None = None


@dataclass
class Teacher:
    """The target at every position of a window, over the drafter's kept vocabulary, kept sparse: its top-k
    probabilities (not renormalised: the mass outside the kept ids is lost to the drafter anyway), the mass on
    all kept ids, and the target's greedy choice over the full vocabulary."""
    idx: torch.Tensor        # [T, K] indices into the kept ids
    probs: torch.Tensor      # [T, K]
    kept_mass: torch.Tensor  # [T]
    argmax: torch.Tensor     # [T] full-vocabulary ids
    # [T, H] the target's post-norm last hidden state at each position, for feature drafters (EAGLE) only;
    # 16-bit (float16, or the target's own 16-bit dtype) to bound the replay buffer's memory.
    features: torch.Tensor | None = None


def window_from_record(rec: dict, record_id: str | None = None) -> Window:
    n = rec["rejected_pos"]
    ids = rec["context"] + rec["drafts"][:n] + [rec["target_token"]]
    rejected = n < len(rec["drafts"])  # else a coverage record: nothing was rejected in that round
    served = (rec["topk_ids"], rec["topk_logprobs"]) if rec.get("constrained") and rejected else None
    return Window(ids=ids, rejected_row=len(rec["context"]) - 1 + n if rejected else None,
                  greedy=rec.get("temperature", 0.0) <= 1e-5,
                  record_id=record_id, label=rec.get("label", ""), served=served)


def pad_windows(windows: list[Window], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w.ids) for w in windows)
    x = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.bool)
    for r, w in enumerate(windows):
        x[r, :len(w.ids)] = torch.tensor(w.ids)
        mask[r, :len(w.ids)] = True
    return x.to(device), mask.to(device)


@torch.inference_mode()
def score_windows(target, kept_ids: torch.Tensor, windows: list[Window], topk: int, batch: int = 8,
                  features: bool = False) -> None:
    """Fill ``w.teacher`` for windows that lack it: one right-padded target forward per batch (causal attention
    keeps the real positions unaffected by the padding). ``features``: also keep the target's last hidden states
    (feature drafters), taken from the same forward (body, then lm_head)."""
    todo = [w for w in windows if w.teacher is None or (features and w.teacher.features is None)]
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        x, _ = pad_windows(chunk, kept_ids.device)
        if features:
            hidden = target.model(input_ids=x).last_hidden_state
            logits = target.lm_head(hidden).float()
            hidden = hidden.to(torch.float16) if hidden.dtype == torch.float32 else hidden
        else:
            logits = target(input_ids=x).logits.float()
        p = torch.softmax(logits, -1)
        argmax = logits.argmax(-1)
        pk = p[..., kept_ids]
        top = pk.topk(min(topk, pk.shape[-1]), dim=-1)
        mass = pk.sum(-1)
        for r, w in enumerate(chunk):
            n = len(w.ids)
            w.teacher = Teacher(top.indices[r, :n].clone(), top.values[r, :n].clone(), mass[r, :n].clone(),
                                argmax[r, :n].clone(), hidden[r, :n].clone() if features else None)
            if w.served is not None:
                _serve_teacher(w, kept_ids)


def _serve_teacher(w: Window, kept_ids: torch.Tensor) -> None:
    """The teacher at a constrained window's rejected row becomes the masked distribution its record carries
    (over the kept ids; the unmasked target's other top-k entries stay listed with probability 0)."""
    t, row = w.teacher, w.rejected_row
    where = {int(v): i for i, v in enumerate(kept_ids.tolist())}
    pairs = [(where[i], math.exp(lp)) for i, lp in zip(*w.served) if i in where]
    if row is None or row >= len(w.ids) or not pairs:
        w.rejected_row = None  # nothing the drafter could learn there: the window teaches nothing
        return
    k = t.idx.shape[1]
    pairs = pairs[:k]
    used = {i for i, _ in pairs}
    fill = [int(i) for i in t.idx[row].tolist() if int(i) not in used][:k - len(pairs)]
    t.idx[row] = torch.tensor([i for i, _ in pairs] + fill, dtype=t.idx.dtype)
    t.probs[row] = torch.tensor([p for _, p in pairs] + [0.0] * len(fill), dtype=t.probs.dtype)
    t.kept_mass[row] = sum(p for _, p in pairs)
    t.argmax[row] = int(w.served[0][0])


def window_features(windows: list[Window], width: int, device, dtype) -> torch.Tensor:
    """[B, width, H] the target's last hidden states of scored windows, right-padded with zeros (h_j at j:
    ``shift_features`` turns them into a feature drafter's input)."""
    hidden = windows[0].teacher.features.shape[-1]
    out = torch.zeros(len(windows), width, hidden, dtype=dtype, device=device)
    for r, w in enumerate(windows):
        out[r, :len(w.ids)] = w.teacher.features.to(device=device, dtype=dtype)
    return out


def dense_teacher_logits(teachers: list[Teacher], vocab: int) -> torch.Tensor:
    """[sum T, V'] log-probabilities over the kept ids: the top-k renormalised by the kept mass, the rest of
    the mass spread evenly (never exactly zero, so reverse KL and JSD stay finite)."""
    idx = torch.cat([t.idx for t in teachers])
    probs = torch.cat([t.probs / t.kept_mass.unsqueeze(-1).clamp_min(1e-12) for t in teachers]).clamp_max(1.0)
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0) / max(vocab - idx.shape[1], 1)
    out = torch.log(rest.clamp_min(1e-12)).expand(idx.shape[0], vocab).clone()
    return out.scatter_(1, idx, torch.log(probs.clamp_min(1e-12)))


class ReplayBuffer:
    """The windows already trained on, kept for more steps: a bounded deque sampled with a recency half-life
    (in windows), so that recent traffic counts most while older windows still guard against forgetting.
    Iterating yields (sequence number, window) pairs, oldest first."""

    def __init__(self, size: int, half_life: float):
        self.items: collections.deque[tuple[int, Window]] = collections.deque(maxlen=size)
        self.half_life = half_life
        self.seen = 0  # windows added so far: the newest one's sequence number

    def add(self, window: Window) -> None:
        self.seen += 1
        self.items.append((self.seen, window))

    def sample(self, n: int, rng: random.Random) -> list[Window]:
        """Up to ``n`` distinct windows, window i drawn with weight 0.5 ** (age_i / half_life)."""
        if not self.items or n <= 0:
            return []
        weights = [0.5 ** ((self.seen - seq) / self.half_life) for seq, _ in self.items]
        picks = rng.choices(range(len(self.items)), weights=weights, k=min(n, len(self.items)))
        return [self.items[i][1] for i in set(picks)]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)
