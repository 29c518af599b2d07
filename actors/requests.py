"""What a request asks of the engine and what it gets back: its sampling parameters (validated, each error
naming its field), the generation and its statistics, and the record a verification round leaves for the
trainer. Plain data; the engine (actors/engine.py) does the work."""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("model", "suffix", "none")


class RequestError(ValueError):
    """A request the engine cannot serve as given (empty prompt, over the context length, bad parameters);
    ``param``: the request field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # None: none; n: the chosen token's log-probability and the n likeliest
    # The controls below (OpenAI's and vLLM's) transform the target's logits at every position (see
    # kernels/logits_processors.py); the drafts are verified against the result, so speculation stays lossless.
    frequency_penalty: float = 0.0    # logit[v] -= count of v in the output * this
    presence_penalty: float = 0.0     # logit[v] -= this, once v occurs in the output
    repetition_penalty: float = 1.0   # v seen in prompt or output: logit / this if positive, * this if not
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0               # the stop ids cannot be generated before this many tokens
    ignore_eos: bool = False          # the stop ids are ordinary tokens: generate until max_tokens
    min_p: float = 0.0                # sampling: drop v with p(v) < min_p * max p (after temperature)
    # Structured output (OpenAI's response_format: json_object or json_schema; tool calls arrive as a
    # json_schema): a grammar masks the target's logits at every position (actors/grammar.py).
    response_format: dict | None = None

    @property
    def penalized(self) -> bool:
        """Whether the target's logits need processing beyond min_tokens (which lapses once met)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"top_logprobs must be in [0, 20], got {self.logprobs}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(tok, int) or tok < 0:
                raise RequestError(f"logit_bias keys must be token ids (ints >= 0), got {tok!r}")
            if not -100.0 <= bias <= 100.0:
                raise RequestError(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    elapsed_s: float = 0.0
    drafter_version: str | None = None
    finish_reason: str | None = None
    # Per draft source: [rounds, drafted, accepted] ("none": rounds that drafted nothing).
    sources: dict = field(default_factory=lambda: {s: [0, 0, 0] for s in SOURCES})

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.completion_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {"acceptance_rate": round(self.acceptance_rate, 4), "drafted": self.drafted,
                "accepted": self.accepted, "tokens_per_step": round(self.tokens_per_step, 4),
                "tokens_per_s": round(self.tokens_per_s, 3), "drafter_version": self.drafter_version,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "draft_sources": self.source_dict()}

    def source_dict(self) -> dict:
        return {s: {"rounds": r, "drafted": d, "accepted": a} for s, (r, d, a) in self.sources.items()}


@dataclass
class RoundRecord:
    """What a verification round teaches the drafter (sent to ``round_observer``): every round with a
    rejection, and a coverage round now and then (``record_coverage``).

    ``context`` ends with the pending token; the drafts followed it; ``accepted`` of them were kept. If
    ``accepted < len(drafts)`` the first rejected one sat at draft position ``accepted``; otherwise nothing was
    rejected (all accepted, or no drafts). Either way the target chose ``target_token`` at position
    ``accepted``, with top-k log-probabilities ``topk_ids`` / ``topk_logprobs`` there."""
    context: list[int]
    drafts: list[int]
    accepted: int
    target_token: int
    topk_ids: list[int]
    topk_logprobs: list[float]
    drafter_version: str | None
    temperature: float = 0.0  # the request's: tells the trainer which divergence suits this traffic
    source: str = "model"     # who drafted: "model", "suffix", or "none" (a coverage record of plain decoding)
    constrained: bool = False  # a structured request: the target's choice and its top-k are grammar-masked
    request: object = None    # the caller's tag of the request (not sent to the stream)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    stats: GenerationStats
