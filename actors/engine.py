"""The speculative decoding engine: one target, one drafter, both with KV caches (transformers' DynamicCache).

A sequence is kept as ``tokens`` (prompt + generated) whose last token is *pending*: sampled but not yet run
through the target. Every round drafts k >= 0 tokens after it, runs the target once over [pending, drafts],
keeps the accepted prefix and one more token from the target, and crops both caches back to what is still valid.
With k = 0 a round is exactly one step of plain target decoding, which is also how ``speculate=False`` runs:
the same code path, the drafter never called.

Drafts come from one of two sources per round (``spec.source``): the drafter model, or text seen before
(SuffixDecoding: the request's own prompt and output, and an index of earlier requests, actors/suffix_index.py).
A suffix draft costs no forward at all; hybrid mode takes it when its expected accepted tokens per second of
verification beat what the drafter model (or plain decoding) is expected to give. Suffix drafts are
deterministic, so under sampling their proposal distribution q is one-hot and the rejection rule stays exact.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from onspec.actors.suffix_index import SuffixDraft, SuffixIndex
from onspec.cluster.config import OnspecConfig, SpeculationConfig, SuffixConfig
from onspec.kernels.draft_length import (AdaEDLState, adaedl_should_stop, adaedl_update, best_draft_length)
from onspec.kernels.sampling import entropy, gumbel_argmax, is_greedy, logits_to_probs, position_gumbel
from onspec.kernels.verify import coupled_verify, greedy_verify, rejection_verify
from onspec.kernels.vocab_trim import to_full_logits

SOURCES = ("model", "suffix", "none")


class RequestError(ValueError):
    """A request the engine cannot serve as given (empty prompt, over the context length, bad parameters)."""


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")


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


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    stats: GenerationStats


def rollback(cache: DynamicCache, keep: int) -> None:
    """Crop a KV cache to its first ``keep`` positions: rejected drafts are dropped, the prefix is reused."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


class DraftController:
    """Chooses each round's maximum draft length from the estimated acceptance and the measured costs
    (kernels.draft_length), probing with a single draft now and then while plain decoding is cheaper, so that
    an improving drafter is noticed."""

    def __init__(self, cfg: SpeculationConfig):
        self.cfg = cfg
        self.reset()
        # Seconds per target forward over n tokens, index n - 1 (set by SpeculativeEngine.calibrate).
        self.verify_cost = [1.0] * (cfg.max_draft + 1)
        self.draft_cost = 0.05

    def reset(self) -> None:
        self.alpha = self.cfg.acceptance_prior
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
        k, _ = best_draft_length(self.alpha, self.draft_cost, self.verify_cost, self.cfg.max_draft)
        self.probing = False
        if k == 0:
            self.plain_steps += 1
            if self.plain_steps >= self.probe_interval:
                self.plain_steps, self.probing = 0, True
                return 1
        return k

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


@dataclass
class _Sequence:
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None
    # A seeded sampled request draws each position's token from noise fixed by (seed, position): its output is
    # then reproducible whatever was drafted, while drafting depends on state shared between requests.
    noise_seed: int | None = None
    tcache: DynamicCache = field(default_factory=DynamicCache)
    dcache: DynamicCache = field(default_factory=DynamicCache)
    dlen: int = 0  # positions in the drafter's cache
    unrecorded: int = 0  # tokens generated since the last RoundRecord
    suffix: SuffixIndex | None = None  # the request's own prompt and output (SuffixDecoding's per-request tree)
    indexed: int = 0  # tokens of ``tokens`` already in ``suffix``
    # The target's last hidden state (post-norm, what its lm_head reads) at every position but the pending one:
    # a feature drafter (EAGLE) reads it. Rows [0, nfeat) are filled; the verification forwards compute them.
    feats: torch.Tensor | None = None
    nfeat: int = 0


def _interpolate(costs: dict[int, float], longest: int) -> list[float]:
    """Costs for every size 1..longest from the measured sizes (piecewise linear)."""
    known = sorted(costs)
    out = []
    for n in range(1, longest + 1):
        if n in costs:
            out.append(costs[n])
            continue
        lo = max(k for k in known if k < n)
        hi = min(k for k in known if k > n)
        out.append(costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo))
    return out


class SpeculativeEngine:
    def __init__(self, target, tokenizer, drafter, spec: SpeculationConfig, max_context: int,
                 stop_ids: set[int] | None = None, suffix: SuffixConfig | None = None):
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.spec = spec
        self.suffix_cfg = suffix or SuffixConfig()
        # Earlier requests' prompts and outputs. Only the decoding thread touches it: other threads (the replica's
        # share reader) put sequences in the inbox, which the decoding thread drains before it proposes.
        self.suffix_index = SuffixIndex(self.suffix_cfg.index_tokens, self.suffix_cfg.max_depth)
        self.suffix_inbox: collections.deque[list[int]] = collections.deque(maxlen=1024)
        self.suffix_trust = 1.0  # observed / predicted accepted suffix tokens (EMA): the index's counts overrate
        # Called with prompt + output of every finished request (the replica shares them); must not block.
        self.sequence_observer: Callable[[list[int]], None] | None = None
        self.max_context = min(max_context, int(getattr(target.config, "max_position_embeddings", max_context)))
        self.vocab_size = target.config.vocab_size
        self.hidden_size = target.config.hidden_size
        self.device = next(target.parameters()).device
        if stop_ids is None:
            from onspec.actors.models import stop_token_ids
            stop_ids = stop_token_ids(target, tokenizer)
        self.stop_ids = stop_ids
        self.controller = DraftController(spec)
        self.calibrated = False
        # Called after every round that rejected a draft (e.g. the stream logger); must not block.
        self.round_observer: Callable[[RoundRecord], None] | None = None
        self.record_context = 128   # context tokens kept in a RoundRecord
        self.record_topk = 8        # target log-probabilities kept at the rejected position
        # Also send a record after this many tokens without one (0: rejections only). A poor drafter makes the
        # controller stop drafting, and then no round rejects anything: without these the trainer would starve
        # exactly when it is needed most.
        self.record_coverage = 0
        self._next_drafter = None   # set by any thread (swap_drafter), taken by the decoding thread
        self._seq = None            # the sequence being decoded, if any
        self.swaps = 0

    @classmethod
    def from_config(cls, cfg: OnspecConfig) -> "SpeculativeEngine":
        from onspec.actors.checkpoint import load_checkpoint
        from onspec.actors.models import load_target, make_drafter, stop_token_ids

        target, tok = load_target(cfg.model, cfg.data_dir)
        stops = stop_token_ids(target, tok)
        if cfg.drafter.checkpoint:
            drafter, _ = load_checkpoint(cfg.drafter.checkpoint, target)
        else:
            drafter = make_drafter(target, cfg.drafter, always_keep=tuple(stops))
        return cls(target, tok, drafter, cfg.speculation, cfg.model.max_context, stops, cfg.suffix)

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        return list(ids)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) + 1 > self.max_context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context length is "
                               f"{self.max_context} (prompt + at least one generated token)")

    # ---- drafter management --------------------------------------------------------------------------------
    def set_drafter(self, drafter) -> None:
        """Swap the drafter now (call it from the decoding thread, or while no request runs)."""
        self.drafter = drafter
        self.controller.reset()  # the acceptance estimate starts afresh for the new drafter
        self.swaps += 1

    def swap_drafter(self, drafter) -> None:
        """Hand over a new drafter from any thread: the decoding thread takes it before its next verification
        round (or the next request), so a round never mixes two drafters. Taking it is one attribute read and
        write under the GIL: nothing to lock."""
        self._next_drafter = drafter

    def apply_pending_swap(self) -> None:
        """Take a handed-over drafter now. Only from the decoding thread (between two steps of ``stream``, or
        while no request runs): that is what makes the swap atomic with respect to rounds."""
        self._take_swap(self._seq)

    def _take_swap(self, seq: "_Sequence | None" = None) -> None:
        drafter, self._next_drafter = self._next_drafter, None
        if drafter is None:
            return
        self.set_drafter(drafter)
        if seq is not None:
            # The old drafter's KV cache means nothing to the new one: it re-reads the sequence on its next draft.
            seq.dcache, seq.dlen = DynamicCache(), 0

    @torch.inference_mode()
    def calibrate(self, reps: int = 3) -> None:
        """Measure target forwards over 1..max_draft+1 tokens and one drafter token.

        Only the ratios between these costs matter to the draft-length choice, and a busy machine slows all of
        them alike, so sizes are interleaved within each repetition and the minimum is kept: a burst of
        contention cannot make one size look dear and then never be tried (and re-measured) again."""
        longest = self.spec.max_draft + 1
        sizes = list(range(1, longest + 1))
        if self.spec.source != "model" and self.suffix_cfg.max_draft + 1 > longest:
            # Suffix drafts run longer: two more sizes, the rest interpolated (verification cost is near linear).
            longest = self.suffix_cfg.max_draft + 1
            sizes += sorted({(sizes[-1] + longest) // 2, longest} - set(sizes))
        ctx = torch.arange(1, longest + 33, device=self.device).unsqueeze(0)
        cache, dcache = DynamicCache(), DynamicCache()
        self.target(input_ids=ctx[:, :32], cache=cache, use_cache=True)
        self._drafter_forward(ctx[:, :32], dcache, torch.zeros(1, 32, self.hidden_size, device=self.device))
        best = {n: float("inf") for n in sizes}
        best_draft = float("inf")
        for _ in range(reps):
            for n in sizes:
                t = time.perf_counter()
                self.target(input_ids=ctx[:, :n], cache=cache, use_cache=True).logits.argmax(-1).tolist()
                best[n] = min(best[n], time.perf_counter() - t)
                rollback(cache, 32)
            t = time.perf_counter()
            self._drafter_forward(ctx[:, :1], dcache, torch.zeros(1, 1, self.hidden_size, device=self.device))[0] \
                .argmax(-1).tolist()
            best_draft = min(best_draft, time.perf_counter() - t)
            rollback(dcache, 32)
        self.controller.verify_cost = _interpolate(best, longest)
        self.controller.draft_cost = best_draft
        self.calibrated = True

    # ---- decoding ------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 speculate: bool = True) -> Generation:
        params = params or SamplingParams()
        stats = GenerationStats()
        out: list[int] = []
        for chunk in self.stream(prompt_ids, params, speculate, stats):
            out.extend(chunk)
        return Generation(out, self.tokenizer.decode(out, skip_special_tokens=True), stats)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams, speculate: bool = True,
               stats: GenerationStats | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of each round. ``stats`` (if given) is filled in as decoding goes."""
        params.validate()
        self.check_prompt(prompt_ids)
        stats = stats if stats is not None else GenerationStats()
        self._take_swap()
        if speculate and not self.calibrated and self.spec.cost_aware and self.spec.mode == "adaedl":
            self.calibrate()
        t0 = time.perf_counter()
        stats.prompt_tokens = len(prompt_ids)
        stats.drafter_version = getattr(self.drafter, "version", None) if speculate else None
        gen = None
        if not is_greedy(params.temperature):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else int(torch.seed() % (2**63)))
        seq = _Sequence(tokens=list(prompt_ids), prompt_len=len(prompt_ids), params=params, generator=gen,
                        noise_seed=params.seed if gen is not None else None)
        if speculate and self.spec.source != "model":
            seq.suffix = SuffixIndex(self.max_context, self.suffix_cfg.max_depth)
        self._seq = seq
        budget = min(params.max_tokens, self.max_context - len(prompt_ids))

        try:
            new = [self._prefill(seq)]
            stats.target_forwards += 1
            stats.sources["none"][0] += 1
            while True:
                new, done = self._finish(seq, new, budget, stats)
                stats.completion_tokens += len(new)
                stats.elapsed_s = time.perf_counter() - t0
                if new:
                    yield new
                if done:
                    return
                new = self._round(seq, speculate, budget, stats)
        finally:
            self._seq = None
            if speculate:  # target-only runs (benchmark baselines) must not teach the index their answers
                self._remember(seq.tokens[:seq.prompt_len + stats.completion_tokens])

    def _remember(self, tokens: list[int]) -> None:
        """A finished request's prompt and output go into the suffix index (and to whoever shares it)."""
        if len(tokens) < 3:
            return
        if self.spec.source != "model":
            self.suffix_index.add(tokens)
        if self.sequence_observer is not None:
            self.sequence_observer(tokens)

    def _suffix_draft(self, seq: _Sequence, cap: int) -> SuffixDraft | None:
        """The better of the two indexes' proposals for the sequence's continuation (the paper's rule)."""
        while self.suffix_inbox:
            self.suffix_index.add(self.suffix_inbox.popleft())
        if len(seq.tokens) > seq.indexed:
            seq.suffix.append(seq.tokens[seq.indexed:])
            seq.indexed = len(seq.tokens)
        c = self.suffix_cfg
        cap = min(cap, c.max_draft)
        best = None
        for index in (seq.suffix, self.suffix_index):
            d = index.propose(seq.tokens, cap, c.alpha, c.min_prob)
            if d is not None and (best is None or d.score > best.score):
                best = d
        return best

    def _verify_cost(self, n: int) -> float:
        costs = self.controller.verify_cost
        return costs[n - 1] if n <= len(costs) else costs[-1] * n / len(costs)

    def _suffix_pays(self, d: SuffixDraft) -> bool:
        """Hybrid rule: expected tokens per second of this suffix draft vs the best the drafter model (or plain
        decoding) is expected to give, both from the costs measured by ``calibrate`` (Leviathan et al. eq. 1
        for the model; the index's own score, scaled by how well it has predicted so far, for the suffix)."""
        ctl = self.controller
        suffix_rate = (1.0 + self.suffix_trust * d.score) / self._verify_cost(len(d.tokens) + 1)
        _, speedup = best_draft_length(ctl.alpha, ctl.draft_cost, ctl.verify_cost, self.spec.max_draft)
        return suffix_rate > speedup / ctl.verify_cost[0]

    def _plan(self, seq: _Sequence, speculate: bool, room: int) -> tuple[str, int, SuffixDraft | None]:
        """This round's source and, for the model, its draft cap."""
        if not speculate or room <= 0:
            return "none", 0, None
        source = self.spec.source
        if source != "model":
            d = self._suffix_draft(seq, room)
            if d is not None and (source == "suffix" or self._suffix_pays(d)):
                return "suffix", len(d.tokens), d
            if source == "suffix":
                return "none", 0, None
        cap = min(self.controller.draft_cap(), room)
        return ("model" if cap > 0 else "none"), cap, None

    def _finish(self, seq: _Sequence, new: list[int], budget: int, stats: GenerationStats):
        """Cut ``new`` at the first stop token or the token budget; tokens are already in seq.tokens."""
        produced_before = len(seq.tokens) - len(new) - seq.prompt_len
        for i, tok in enumerate(new):
            if tok in self.stop_ids:
                stats.finish_reason = "stop"
                return new[:i + 1], True
            if produced_before + i + 1 >= budget:
                stats.finish_reason = "length"
                return new[:i + 1], True
        return new, False

    def _next_token(self, logits: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        p = seq.params
        if is_greedy(p.temperature):
            return logits.argmax(-1)
        probs = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
        if seq.noise_seed is not None:
            return gumbel_argmax(probs, self._noise(seq, len(seq.tokens), 1)[0])
        return torch.multinomial(probs, 1, generator=seq.generator)[0]

    def _noise(self, seq: _Sequence, start: int, n: int) -> torch.Tensor:
        return position_gumbel(seq.noise_seed, range(start, start + n), self.vocab_size, self.device)

    def _target_forward(self, seq: _Sequence, x: torch.Tensor, last_only: bool = False) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
        """One target forward over ``x`` [1, n] with the sequence's cache: (logits [n or 1, V], hidden [n, H]).
        The same work as calling the model (its body, then the head), keeping the hidden states a feature
        drafter reads: no extra target pass."""
        hidden = self.target.model(input_ids=x, cache=seq.tcache, use_cache=True).last_hidden_state[0]
        logits = self.target.lm_head(hidden[-1:] if last_only else hidden)
        return logits, hidden

    def _keep_features(self, seq: _Sequence, hidden: torch.Tensor) -> None:
        if seq.feats is None:
            seq.feats = torch.empty(self.max_context, self.hidden_size, device=self.device, dtype=hidden.dtype)
        seq.feats[seq.nfeat:seq.nfeat + hidden.shape[0]] = hidden
        seq.nfeat += hidden.shape[0]

    def _prefill(self, seq: _Sequence) -> int:
        x = torch.tensor([seq.tokens], device=self.device)
        logits, hidden = self._target_forward(seq, x, last_only=True)
        self._keep_features(seq, hidden)
        logits = logits[-1]
        tok = int(self._next_token(logits, seq))
        seq.tokens.append(tok)
        return tok

    def _draft(self, seq: _Sequence, cap: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``cap`` drafter tokens after the pending one, stopping early on AdaEDL's entropy bound.
        Returns (drafts, their distributions q when sampling)."""
        p = seq.params
        greedy = is_greedy(p.temperature)
        kept = self.drafter.kept_ids
        threshold = self.controller.entropy_threshold
        x = torch.tensor([seq.tokens[seq.dlen:]], device=self.device)
        feats = None
        if getattr(self.drafter, "kind", None) == "feature":
            # Position i pairs token i with the target's feature at i - 1 (zeros before the first token).
            lo = seq.dlen
            prev = seq.feats[max(lo - 1, 0):seq.nfeat]
            if lo == 0:
                prev = torch.cat([torch.zeros_like(prev[:1]), prev])
            feats = prev.unsqueeze(0)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        for _ in range(cap):
            logits, hidden = self._drafter_forward(x, seq.dcache, feats)
            logits = logits[0, -1].float()
            seq.dlen += x.shape[1]
            if hidden is not None:  # drafting ahead feeds the drafter's own predicted feature back in
                feats = hidden[:, -1:]
            if greedy:
                q = torch.softmax(logits, -1)
                tok_dev = kept[q.argmax()]
            else:
                q = logits_to_probs(to_full_logits(logits, kept, self.vocab_size), p.temperature, p.top_k, p.top_p)
                if seq.noise_seed is not None:  # the noise the target will use at this position
                    tok_dev = gumbel_argmax(q, self._noise(seq, len(seq.tokens) + len(drafts), 1)[0])
                else:
                    tok_dev = torch.multinomial(q, 1, generator=seq.generator)[0]
            tok, h = torch.stack([tok_dev.to(q.dtype), entropy(q)]).tolist()  # one sync for both
            if threshold is not None and adaedl_should_stop(h, self.spec.adaedl_gamma, threshold):
                break
            drafts.append(int(tok))
            if not greedy:
                qs.append(q)
            x = torch.tensor([[int(tok)]], device=self.device)
        return drafts, (torch.stack(qs) if qs else None)

    def _drafter_forward(self, x: torch.Tensor, cache, feats: torch.Tensor | None):
        """Either drafter kind behind one call: (kept-vocabulary logits, predicted features or None)."""
        if getattr(self.drafter, "kind", None) == "feature":
            return self.drafter(x, feats, cache)
        return self.drafter(x, cache), None

    def _observe(self, seq: _Sequence, old_len: int, drafts: list[int], n: int, nxt: int,
                 row: torch.Tensor, source: str = "model") -> None:
        top = torch.log_softmax(row.float(), -1).topk(self.record_topk)
        self.round_observer(RoundRecord(
            context=seq.tokens[max(0, old_len - self.record_context):old_len], drafts=drafts, accepted=n,
            target_token=nxt, topk_ids=top.indices.tolist(), topk_logprobs=top.values.tolist(),
            drafter_version=getattr(self.drafter, "version", None), temperature=float(seq.params.temperature),
            source=source))

    def _ends(self, seq: _Sequence, new: list[int], budget: int) -> bool:
        """Whether this round's tokens end the request (what _finish will find)."""
        return any(t in self.stop_ids for t in new) or len(seq.tokens) - seq.prompt_len >= budget \
            or len(seq.tokens) >= self.max_context

    def _round(self, seq: _Sequence, speculate: bool, budget: int, stats: GenerationStats) -> list[int]:
        if self._next_drafter is not None:
            self._take_swap(seq)
        if speculate:  # a request that saw a swap reports the drafter that finished it
            stats.drafter_version = getattr(self.drafter, "version", None)
        old_len = len(seq.tokens)  # the pending token sits at old_len - 1
        room = min(self.max_context - old_len - 1, budget - (old_len - seq.prompt_len))
        source, cap, sd = self._plan(seq, speculate, room)
        if source == "suffix":
            drafts, q = sd.tokens, None
            if not is_greedy(seq.params.temperature):  # a deterministic proposal: q is one-hot
                q = torch.zeros(len(drafts), self.vocab_size, device=self.device)
                q[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
        else:
            drafts, q = self._draft(seq, cap) if cap > 0 else ([], None)
        k = len(drafts)
        if k == 0:
            source = "none"
        x = torch.tensor([[seq.tokens[-1]] + drafts], device=self.device)
        logits, hidden = self._target_forward(seq, x)
        logits = logits.float()
        d = torch.tensor(drafts, device=self.device, dtype=torch.long)
        if is_greedy(seq.params.temperature):
            n, nxt = greedy_verify(d, logits)
        else:
            probs = logits_to_probs(logits, seq.params.temperature, seq.params.top_k, seq.params.top_p)
            if seq.noise_seed is not None:
                n, nxt = coupled_verify(d, probs, self._noise(seq, old_len, k + 1))
            else:
                n, nxt = rejection_verify(d, q if q is not None else probs[:0], probs, seq.generator)
        n, nxt = torch.stack([n, nxt]).tolist()

        rollback(seq.tcache, old_len + n)
        self._keep_features(seq, hidden[:n + 1])
        # A feature drafter's cache past the pending token was built on its own predicted features: it re-reads
        # those positions with the target's real ones next round.
        seq.dlen = min(seq.dlen, old_len if getattr(self.drafter, "kind", None) == "feature" else old_len + n)
        rollback(seq.dcache, seq.dlen)
        new = drafts[:n] + [nxt]
        seq.tokens.extend(new)

        if self.round_observer is not None:
            seq.unrecorded += len(new)
            # The request's last round also sends its tail: with coverage on, every served token reaches the
            # trainer inside some record's window.
            if n < k or (self.record_coverage and (seq.unrecorded >= self.record_coverage
                                                   or self._ends(seq, new, budget))):
                seq.unrecorded = 0
                self._observe(seq, old_len, drafts, n, nxt, logits[n], source)
        stats.target_forwards += 1
        stats.drafted += k
        stats.accepted += n
        tally = stats.sources[source]
        tally[0] += 1
        tally[1] += k
        tally[2] += n
        if source == "model":
            self.controller.observe(k, n, cap)
        elif source == "suffix":
            ema = self.spec.acceptance_ema
            self.suffix_trust = min(1.0, max(0.05, ema * self.suffix_trust + (1 - ema) * n / sd.score))
        return new
