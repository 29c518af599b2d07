"""The draft-length controller: each round's longest draft from the estimated acceptance and the measured
costs (kernels/draft_length.py: Leviathan et al.'s expected tokens, AdaEDL's entropy bound)."""
from __future__ import annotations

from onspec.actors.config import SpeculationConfig
from onspec.kernels.draft_length import AdaEDLState, adaedl_update, best_draft_length


class DraftController:
    """Chooses each round's maximum draft length from the estimated acceptance and the measured costs
    (kernels.draft_length), probing with a single draft now and then while plain decoding is cheaper, so that
    an improving drafter is noticed."""

    def __init__(self, cfg: SpeculationConfig):
        self.cfg = cfg
        self.reset()
        # Seconds per target forward over n tokens, index n - 1 (set by SpeculativeEngine.calibrate).
        self.verify_cost = [1.0] * (cfg.max_draft + 1)
        self.draft_cost = 0.05  # one drafter token for one row
        self.draft_scale = 1.0  # per-row drafter cost in the current batch / draft_cost (batching shares it)

    def reset(self) -> None:
        self.alpha = self.cfg.acceptance_prior
        # Accepted tokens per draft slot offered, over every round planned for the model (AdaEDL's early stops
        # count as 0): what a slot of a batch's width really yields, where alpha is per token actually drafted.
        self.slot_yield = self.cfg.acceptance_prior
        self.adaedl = AdaEDLState(lam=self.cfg.adaedl_lambda, acceptance=self.cfg.acceptance_prior)
        self.plain_steps = 0
        self.probe_interval = self.cfg.probe_interval
        self.probing = False

    @property
    def entropy_threshold(self) -> float | None:
        return self.adaedl.lam if self.cfg.mode == "adaedl" else None

    def draft_cap(self) -> int:
        if self.cfg.mode == "fixed":
            return self.cfg.fixed_k
        if not self.cfg.cost_aware:
            return self.cfg.max_draft
        k, _ = best_draft_length(self.alpha, self.draft_cost * self.draft_scale, self.verify_cost,
                                 self.cfg.max_draft)
        self.probing = False
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_interval:
                self.plain_steps, self.probing = 0, True
                return 1
        return k

    def observe_slots(self, cap: int, accepted: int) -> None:
        if cap > 0:
            ema = self.cfg.acceptance_ema
            self.slot_yield = ema * self.slot_yield + (1 - ema) * accepted / cap

    def observe(self, drafted: int, accepted: int, cap: int) -> None:
        if drafted == 0:
            return
        ema = self.cfg.acceptance_ema
        self.alpha = ema * self.alpha + (1 - ema) * accepted / drafted
        self.adaedl = adaedl_update(self.adaedl, drafted, accepted, cap)
        if self.probing:
            grow = accepted == 0
            self.probe_interval = min(self.probe_interval * 2, self.cfg.probe_interval_max) if grow \
                else self.cfg.probe_interval
