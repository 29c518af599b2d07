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
        # What single-row rounds really took (wall seconds, drafting and bookkeeping included) and gave: a
        # model round pays a drafter forward even when AdaEDL stops before its first draft, which alpha (per
        # drafted token) never sees. None until such a round was observed.
        self.plain_time: float | None = None
        self.rounds: dict[str, tuple[float, float]] = {}  # "model" / "suffix": (EMA seconds, EMA tokens)

    @property
    def entropy_threshold(self) -> float | None:
        return self.adaedl.lam if self.cfg.mode == "adaedl" else None

    def draft_cap(self) -> int:
        if self.cfg.mode == "fixed":
            return self.cfg.fixed_k
        if not self.cfg.cost_aware:
            return self.cfg.max_draft
        k, predicted = best_draft_length(self.alpha, self.draft_cost * self.draft_scale, self.verify_cost,
                                         self.cfg.max_draft)
        if k > 0 and self.model_speedup(predicted) < 1.0:  # what model rounds really gave is less than plain decoding
            k = 0
        self.probing = False
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_interval:
                self.plain_steps, self.probing = 0, True
                return 1
        return k

    def model_speedup(self, predicted: float | None = None) -> float:
        """Model rounds' tokens per second over plain rounds', as observed (each side's wall time per round, an
        EMA), at most Leviathan et al.'s prediction from alpha and the calibrated costs (``predicted``, when the
        caller has it), which stands alone until model rounds were observed."""
        if predicted is None:
            predicted = best_draft_length(self.alpha, self.draft_cost * self.draft_scale, self.verify_cost,
                                          self.cfg.max_draft)[1]
        realized = self.realized_speedup("model")
        return predicted if realized is None else min(predicted, realized)

    def realized_speedup(self, source: str) -> float | None:
        """Tokens per second of ``source``'s rounds over plain rounds', as observed; None before its first."""
        if source not in self.rounds:
            return None
        seconds, tokens = self.rounds[source]
        return tokens / seconds * (self.plain_time if self.plain_time is not None else self.verify_cost[0])

    def observe_round(self, source: str, tokens: int, seconds: float) -> None:
        """A single-row round's wall time and tokens, by its planned source ("model" even when AdaEDL stopped
        before the first draft; "none": plain decoding)."""
        ema = 0.95  # a round's time varies with the machine's load: a longer memory than acceptance's
        if source == "none":
            self.plain_time = seconds if self.plain_time is None else ema * self.plain_time + (1 - ema) * seconds
        elif source in self.rounds:
            s, t = self.rounds[source]
            self.rounds[source] = (ema * s + (1 - ema) * seconds, ema * t + (1 - ema) * tokens)
        else:
            self.rounds[source] = (seconds, float(tokens))
        if source == "model" and self.probing:
            # A probe of a drafter whose rounds still lose to plain decoding: probe less often (a new drafter
            # resets the controller, so it is tried afresh).
            slow = self.realized_speedup("model") < 1.0
            self.probe_interval = min(self.probe_interval * 2, self.cfg.probe_interval_max) if slow \
                else self.cfg.probe_interval

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
        if self.probing and "model" not in self.rounds:  # no single-row round timed yet (observe_round)
            grow = accepted == 0
            self.probe_interval = min(self.probe_interval * 2, self.cfg.probe_interval_max) if grow \
                else self.cfg.probe_interval
