"""The speculative decoding engine: one target, one drafter, many sequences decoded together (continuous
batching over per-row KV caches, actors/row_cache.py).

A sequence is kept as ``tokens`` (prompt + generated) whose last token is *pending*: sampled but not yet run
through the target. Every round drafts k >= 0 tokens after it, runs the target once over [pending, drafts],
keeps the accepted prefix and one more token from the target, and sets both caches' row lengths back to what is
still valid. All decoding rows share one target forward per round, each with its own draft length.
With k = 0 a round is exactly one step of plain target decoding, which is also how ``speculate=False`` runs:
the same code path, the drafter never called.

Drafts come from one of two sources per round (``spec.source``): the drafter model, or text seen before
(SuffixDecoding: the request's own prompt and output, and an index of earlier requests, actors/suffix_index.py).
A suffix draft costs no forward at all; hybrid mode takes it when its expected accepted tokens per second of
verification beat what the drafter model (or plain decoding) is expected to give. Suffix drafts are
deterministic, so under sampling their proposal distribution q is one-hot and the rejection rule stays exact.

What a request asks and gets back is in actors/requests.py, the draft-length controller in
actors/draft_control.py. Longer than ~500 lines: a round reads and moves every row's state (tokens, both caches'
lengths, features, grammar, the controller), and keeping the round's steps beside the state they move is what
lets them be read as one step.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from onspec.actors.draft_control import DraftController
from onspec.actors.requests import Generation, GenerationStats, RequestError, RoundRecord, SamplingParams
from onspec.actors.row_cache import RowCache, body_forward
from onspec.actors.suffix_index import SuffixDraft, SuffixIndex
from onspec.actors.config import OnspecConfig, SpeculationConfig, SuffixConfig
from onspec.kernels.draft_length import adaedl_should_stop, best_batch_width, expected_tokens
from onspec.kernels.logits_processors import process_logits
from onspec.kernels.sampling import entropy, gumbel_argmax, is_greedy, logits_to_probs, position_gumbel
from onspec.kernels.verify import coupled_verify, greedy_verify, rejection_verify
from onspec.kernels.vocab_trim import to_full_logits

@dataclass
class _Sequence:
    """One request inside the engine: its tokens, sampling state, cache rows and figures."""
    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    out_start: int            # where the output begins for the penalties (before prompt_len when resumed)
    generator: torch.Generator | None
    speculate: bool = True
    budget: int = 0           # most tokens it may generate
    stats: GenerationStats = field(default_factory=GenerationStats)
    tag: object = None        # the caller's (the replica's label and request id), carried into RoundRecords
    # A seeded sampled request draws each position's token from noise fixed by (seed, position): its output is
    # then reproducible whatever was drafted and whatever shares its batch.
    noise_seed: int | None = None
    slot: int = -1            # row of the engine's RowCaches
    tlen: int = 0             # positions in the target's cache row (all tokens but the pending one, once decoding)
    dlen: int = 0             # positions in the drafter's cache row
    unrecorded: int = 0       # tokens generated since the last RoundRecord
    suffix: SuffixIndex | None = None  # the request's own prompt and output (SuffixDecoding's per-request tree)
    indexed: int = 0          # tokens of ``tokens`` already in ``suffix``
    # The target's last hidden state (post-norm, what its lm_head reads) at every position but the pending one:
    # a feature drafter (EAGLE) reads it. Rows [0, nfeat) are filled; the verification forwards compute them.
    feats: torch.Tensor | None = None
    nfeat: int = 0
    prompt_ids: torch.Tensor | None = None  # on the device, with the dense logit_bias: made on first processing
    bias: torch.Tensor | None = None
    constraint: object | None = None  # actors/grammar.Constraint: the grammar's state after the accepted tokens
    new: list[int] = field(default_factory=list)        # tokens of the last step (what the caller streams)
    logprobs: list = field(default_factory=list)        # per new token: (logprob, [(id, logprob), ...])
    finished: bool = False
    t0: float = 0.0

    @property
    def produced(self) -> int:
        return len(self.tokens) - self.prompt_len


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
    """Continuous batching: ``submit`` adds a request, every ``step`` runs one round over all decoding rows (one
    target forward, each row with its own draft length, 0 allowed) after at most one chunk of a joining request's
    prefill, and finished or cancelled rows leave between steps. ``stream``/``generate`` run one request alone.
    Only one thread may call into an engine (the replica's decoding thread)."""

    def __init__(self, target, tokenizer, drafter, spec: SpeculationConfig, max_context: int,
                 stop_ids: set[int] | None = None, suffix: SuffixConfig | None = None, max_rows: int = 8,
                 prefill_chunk: int = 256, drafter_dtype: str = "auto"):
        self.target, self.tokenizer = target, tokenizer
        self.drafter_dtype = drafter_dtype
        self.drafter = self.for_serving(drafter)
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
        self._grammars = None  # actors/grammar.GrammarCompiler, made by the first structured request
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
        self.swaps = 0
        self.max_rows, self.prefill_chunk = max_rows, prefill_chunk
        self.active: list[_Sequence] = []                       # decoding, in slots 0 .. len(active) - 1
        self.joining: collections.deque[_Sequence] = collections.deque()  # waiting for (or in) prefill
        self.tcache = RowCache(target.model, max_rows + 1, 64, self.max_context + 64)  # + 1: a joiner's row
        self.dcache: RowCache | None = None                     # the drafter's, made on its first draft
        self._dcache_of = None
        # Seconds per target forward by rows (1, 2, 4, ...) and tokens per row (set by calibrate).
        self.batch_costs: dict[int, list[float]] = {}
        self.draft_costs: dict[int, float] = {}
        self._catchup_s = 0.0  # this round's drafter catch-up on a long backlog (see _round)

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
        return cls(target, tok, drafter, cfg.speculation, cfg.model.max_context, stops, cfg.suffix,
                   cfg.server.max_batch, cfg.server.prefill_chunk, cfg.drafter.dtype)

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None) -> list[int]:
        """A prompt's ids, or a conversation's through the chat template (with ``tools`` described, when the
        template renders them: RequestError otherwise, since the model would answer without knowing them)."""
        if messages is not None:
            render = self.tokenizer.apply_chat_template
            ids = render(messages, tools=tools or None, add_generation_prompt=True, tokenize=True,
                         return_dict=True)["input_ids"]
            if tools and list(ids) == list(render(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]):
                raise RequestError("the served chat template does not render tools, so tool_choice \"auto\" "
                                   "cannot work; serve one that does (model.chat_template, e.g. hermes_tools)")
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
    def for_serving(self, drafter):
        """The drafter at its served precision (``drafter.dtype``). auto: over a 4-bit target, an 8-bit copy on
        the target's 4-bit kernel. A drafted token's cost is mostly dispatch, so 8-bit blocks cost what 4-bit
        ones do (both ~35% less than fp32) while keeping fp32's acceptance, which 4 bits lose 2-3 points of
        (BENCHMARKS.md). The caller's drafter (the trainer's, the registry's) is left as it was. Speculation
        stays exact whatever the drafter's precision."""
        from onspec.actors.int4_linear import Int4Linear, int4_copy

        want = self.drafter_dtype
        if want == "auto":
            want = "int8" if any(isinstance(m, Int4Linear) for m in self.target.modules()) else "float32"
        if drafter is None or want not in ("int4", "int8") or getattr(drafter, "served_int4", False):
            return drafter
        if next(self.target.parameters()).device.type != "cpu":
            raise ValueError(f"drafter.dtype {want} needs a CPU target (torch's int4 CPU matmul)")
        # What the drafter shares with the target (its embedding) stays shared, not copied.
        shared = {id(t): t for t in (*self.target.modules(), *self.target.parameters(), *self.target.buffers())}
        served = int4_copy(drafter, shared, bits=8 if want == "int8" else 4)
        served.served_int4 = True
        compiled = getattr(self.target.model, "compiled_layers", None)
        if compiled is not None:  # the drafter's layers too (a drafted token: 1.6 -> 0.8 ms), into the same dir
            from onspec.actors.compiled_layers import compile_layers
            served.body.compiled_layers = compile_layers(served.body, compiled.folder.parent, chunks=False)
        return served

    def set_drafter(self, drafter) -> None:
        """Swap the drafter now (call it from the decoding thread, or while no request runs)."""
        self.drafter = self.for_serving(drafter)
        self.controller.reset()  # the acceptance estimate starts afresh for the new drafter
        self.swaps += 1
        # The old drafter's cache means nothing to the new one: every row re-reads its sequence on its next draft.
        self.dcache = None
        for seq in self.active:
            seq.dlen = 0

    def swap_drafter(self, drafter) -> None:
        """Hand over a new drafter from any thread: the decoding thread takes it before its next verification
        round (or the next request), so a round never mixes two drafters. Taking it is one attribute read and
        write under the GIL: nothing to lock."""
        self._next_drafter = self.for_serving(drafter)  # made in the caller's thread, not the decoding one

    def apply_pending_swap(self) -> None:
        """Take a handed-over drafter now. Only from the decoding thread (between two steps): that is what
        makes the swap atomic with respect to rounds."""
        drafter, self._next_drafter = self._next_drafter, None
        if drafter is not None:
            self.set_drafter(drafter)

    def _drafter_cache(self) -> RowCache:
        """The current drafter's cache rows; a drafter assigned directly (bench decode switches modes that way)
        gets fresh ones, and every row re-reads its sequence."""
        if self.dcache is None or self._dcache_of is not self.drafter:
            self.dcache, self._dcache_of = RowCache(self.drafter.body, self.max_rows + 1, 64,
                                                    self.max_context + 64), self.drafter
            for seq in self.active:
                seq.dlen = 0
        return self.dcache

    # ---- costs ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self) -> None:
        """Calibrate the cost model if the draft-length policy reads it and it has not been measured yet (a
        served replica does this before it reports ready, so that no request waits for it)."""
        if not self.calibrated and self.spec.cost_aware and self.spec.mode == "adaedl":
            self.calibrate()

    @torch.inference_mode()
    def calibrate(self, reps: int = 3) -> None:
        """Measure target forwards over rows x tokens (1, 2, 4, ... rows; 1..max_draft+1 tokens each) and one
        drafter token per row.

        Only the ratios between these costs matter to the draft-length choice, and a busy machine slows all of
        them alike, so sizes are interleaved within each repetition and the minimum is kept: a burst of
        contention cannot make one size look dear and then never be tried (and re-measured) again."""
        longest = self.spec.max_draft + 1
        sizes = list(range(1, longest + 1))
        if self.spec.source != "model" and self.suffix_cfg.max_draft + 1 > longest:
            # Suffix drafts run longer: two more sizes, the rest interpolated (verification cost is near linear).
            longest = self.suffix_cfg.max_draft + 1
            sizes += sorted({(sizes[-1] + longest) // 2, longest} - set(sizes))
        rows = [1]
        while rows[-1] * 2 <= self.max_rows:
            rows.append(rows[-1] * 2)
        if rows[-1] != self.max_rows:
            rows.append(self.max_rows)
        tc = RowCache(self.target.model, self.max_rows, 32 + longest)
        dc = RowCache(self.drafter.body, self.max_rows, 33)
        ctx = torch.full((self.max_rows,), 32, dtype=torch.long, device=self.device)
        ids = torch.arange(1, longest + 1, device=self.device).repeat(self.max_rows, 1)
        best = {(b, n): float("inf") for b in rows for n in sizes}
        best_draft = {b: float("inf") for b in rows}
        for _ in range(reps):
            for b in rows:
                for n in sizes:
                    t = time.perf_counter()
                    hidden = body_forward(self.target.model, self.target.model.embed_tokens(ids[:b, :n]), tc, 0,
                                          ctx[:b])
                    self.target.lm_head(hidden.reshape(b * n, -1)).argmax(-1).tolist()
                    best[b, n] = min(best[b, n], time.perf_counter() - t)
                t = time.perf_counter()
                feats = torch.zeros(b, 1, self.hidden_size, device=self.device)
                self._drafter_forward(ids[:b, :1], dc, 0, ctx[:b], feats)[0].argmax(-1).tolist()
                best_draft[b] = min(best_draft[b], time.perf_counter() - t)
        self.batch_costs = {b: _interpolate({n: best[b, n] for n in sizes}, longest) for b in rows}
        self.draft_costs = best_draft
        self.controller.draft_cost = best_draft[1]
        self._use_rows(1)
        self.calibrated = True

    def _row_costs(self, b: int) -> tuple[list[float], float]:
        """Per-row target cost by tokens, and the drafter's per-row cost relative to one row alone, of a round
        over ``b`` rows (interpolated between the measured row counts)."""
        known = sorted(self.batch_costs)
        lo = max([r for r in known if r <= b], default=known[0])
        hi = min([r for r in known if r >= b], default=known[-1])
        w = 0.0 if hi == lo else (b - lo) / (hi - lo)
        verify = [((1 - w) * x + w * y) / b for x, y in zip(self.batch_costs[lo], self.batch_costs[hi])]
        draft = ((1 - w) * self.draft_costs[lo] + w * self.draft_costs[hi]) / b
        return verify, draft / self.draft_costs[1]

    def _observe_cost(self, b: int, width: int, seconds: float) -> None:
        """Rounds as they run correct the calibrated cost of their (rows, width) (an EMA): what a round really
        takes under this process's load (an ingress, a logger, a trainer on the same cores) is what the width
        and draft-length choices must weigh, and a burst shifts it by a tenth at most."""
        costs = self.batch_costs.get(b)
        if costs is not None and width <= len(costs):
            costs[width - 1] = 0.9 * costs[width - 1] + 0.1 * seconds

    def _use_rows(self, b: int) -> None:
        """Give the controller the costs of a round over ``b`` rows: the k it picks maximises accepted tokens per
        second of the whole batch, and falls to 0 (plain decoding) once the batch is compute-bound."""
        if self.batch_costs:
            self.controller.verify_cost, self.controller.draft_scale = self._row_costs(b)

    # ---- requests ------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, speculate: bool = True,
               stats: GenerationStats | None = None, tag: object = None, resumed: int = 0) -> _Sequence:
        """Queue a request; it joins the batch at a coming step. Raises RequestError for a bad one. ``resumed``:
        the prompt's last tokens are output the request generated before (elsewhere): the penalties count them
        as output, while max_tokens and min_tokens count from the end of the prompt."""
        params.validate()
        self.check_prompt(prompt_ids)
        big = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if big:
            raise RequestError(f"logit_bias token ids must be < the vocabulary size {self.vocab_size}, got {big[0]}")
        gen = None
        if not is_greedy(params.temperature):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else int(torch.seed() % (2**63)))
        constraint = self._constraint(params.response_format, prompt_ids[len(prompt_ids) - resumed:])
        seq = _Sequence(tokens=list(prompt_ids), prompt_len=len(prompt_ids), params=params, generator=gen,
                        constraint=constraint,
                        out_start=len(prompt_ids) - resumed,
                        speculate=speculate, stats=stats if stats is not None else GenerationStats(), tag=tag,
                        noise_seed=params.seed if gen is not None else None, t0=time.perf_counter(),
                        budget=min(params.max_tokens, self.max_context - len(prompt_ids)))
        seq.stats.prompt_tokens = len(prompt_ids)
        seq.stats.drafter_version = getattr(self.drafter, "version", None) if speculate else None
        if speculate and self.spec.source != "model":
            seq.suffix = SuffixIndex(self.max_context, self.suffix_cfg.max_depth)
        self.joining.append(seq)
        return seq

    def cancel(self, seq: _Sequence) -> None:
        """Take a request out now (its caller went away); the others go on."""
        if seq.finished:
            return
        seq.finished = True
        seq.stats.finish_reason = seq.stats.finish_reason or "cancelled"
        if seq in self.joining:
            self.joining.remove(seq)
        if seq in self.active:
            self.active.remove(seq)
        self._pack()

    @property
    def busy(self) -> bool:
        return bool(self.active or self.joining)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 speculate: bool = True) -> Generation:
        params = params or SamplingParams()
        stats = GenerationStats()
        out: list[int] = []
        for chunk in self.stream(prompt_ids, params, speculate, stats):
            out.extend(chunk)
        return Generation(out, self.tokenizer.decode(out, skip_special_tokens=True), stats)

    def stream(self, prompt_ids: list[int], params: SamplingParams, speculate: bool = True,
               stats: GenerationStats | None = None) -> Iterator[list[int]]:
        """One request on its own: yield the new tokens of each round. ``stats`` is filled in as decoding goes."""
        seq = self.submit(prompt_ids, params, speculate, stats)
        try:
            while not seq.finished:
                self.step()
                if seq.new:
                    yield seq.new
        finally:
            self.cancel(seq)

    # ---- one step of the batch -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[_Sequence]:
        """A chunk of prefill for the first joining request (all of it when nothing else is decoding), then one
        verification round over every decoding row. Returns the sequences with new tokens (``seq.new``,
        ``seq.logprobs``) or just finished (``seq.finished``); finished ones have left the batch."""
        self.apply_pending_swap()
        if any(s.speculate for s in self.joining):
            self.warm_up()
        touched: list[_Sequence] = []
        for seq in self.active:
            seq.new, seq.logprobs = [], []
        if self.joining and len(self.active) < self.max_rows:
            seq = self.joining[0]
            seq.new, seq.logprobs = [], []
            self._prefill(seq, whole=not self.active)
            if seq.tlen == seq.prompt_len:  # prefilled: its first token is out, it decodes from the next step
                self.joining.popleft()
                self.active.append(seq)
                touched.append(seq)
        decoding = [s for s in self.active if s not in touched]
        if decoding:
            self._round(decoding)
            touched += decoding
        for seq in touched:
            self._finish(seq)
        if any(s.finished for s in touched):
            self.active = [s for s in self.active if not s.finished]
            self._pack()
        return touched

    def _pack(self) -> None:
        """Rows keep slots 0..n-1 (active, then the joiner being prefilled): a leaver's slot goes to the next."""
        order = self.active + ([self.joining[0]] if self.joining and self.joining[0].slot >= 0 else [])
        for i, seq in enumerate(order):
            if seq.slot != i:
                self.tcache.move(seq.slot, i, seq.tlen)
                if self.dcache is not None:
                    self.dcache.move(seq.slot, i, seq.dlen)
                seq.slot = i

    def _finish(self, seq: _Sequence) -> None:
        """Cut the step's tokens at the first stop token or the budget; the request ends there."""
        st = seq.stats
        before = seq.produced - len(seq.new)
        for i, tok in enumerate(seq.new):
            if self._stops(seq, tok) or before + i + 1 >= seq.budget:
                st.finish_reason = "stop" if self._stops(seq, tok) else "length"
                del seq.new[i + 1:]
                del seq.logprobs[i + 1:]
                seq.finished = True
                break
        st.completion_tokens += len(seq.new)
        st.elapsed_s = time.perf_counter() - seq.t0
        if seq.finished and seq.speculate:  # target-only runs (baselines) must not teach the index their answers
            self._remember(seq.tokens[:seq.prompt_len + st.completion_tokens])

    def _remember(self, tokens: list[int]) -> None:
        """A finished request's prompt and output go into the suffix index (and to whoever shares it)."""
        if len(tokens) < 3:
            return
        if self.spec.source != "model":
            self.suffix_index.add(tokens)
        if self.sequence_observer is not None:
            self.sequence_observer(tokens)

    # ---- the target ----------------------------------------------------------------------------------------
    def _target_rows(self, x: torch.Tensor, start: int, lengths: list[int], prompt_chunk: bool = False
                     ) -> torch.Tensor:
        """The target's body over ``x`` [b, T] for rows start.. holding ``lengths``: post-norm hidden [b, T, H]."""
        body = self.target.model
        return body_forward(body, body.embed_tokens(x), self.tcache, start,
                            torch.tensor(lengths, device=self.device), prompt_chunk)

    def _keep_features(self, seq: _Sequence, hidden: torch.Tensor) -> None:
        if seq.feats is None:
            seq.feats = torch.empty(self.max_context, self.hidden_size, device=self.device, dtype=hidden.dtype)
        seq.feats[seq.nfeat:seq.nfeat + hidden.shape[0]] = hidden
        seq.nfeat += hidden.shape[0]

    def _prefill(self, seq: _Sequence, whole: bool) -> None:
        """The next chunk of the prompt through the target (``whole``: all of it); after the last chunk, the
        first token. Chunks bound how long a joining request holds up the rows already decoding."""
        if seq.slot < 0:
            seq.slot = len(self.active)
        end = seq.prompt_len if whole else min(seq.prompt_len, seq.tlen + self.prefill_chunk)
        while seq.tlen < end:
            stop = min(end, seq.tlen + self.prefill_chunk)
            prompt = seq.tlen < seq.out_start
            if prompt:  # the prompt in causal products per chunk; a resumed output per query, as it was decoded
                stop = min(stop, seq.out_start)
            hidden = self._target_rows(torch.tensor([seq.tokens[seq.tlen:stop]], device=self.device), seq.slot,
                                       [seq.tlen], prompt_chunk=prompt)[0]
            self._keep_features(seq, hidden)
            seq.tlen = stop
        if seq.tlen < seq.prompt_len:
            return
        logits = self.target.lm_head(hidden[-1:]).float()
        seq.stats.target_forwards += 1
        seq.stats.sources["none"][0] += 1
        tok = int(self._next_token(logits[0], seq))
        seq.tokens.append(tok)
        seq.new = [tok]
        if seq.constraint is not None:
            seq.constraint.commit([tok])
        if seq.params.logprobs is not None:
            seq.logprobs = self._logprobs(logits, [tok], seq.params.logprobs)

    def _next_token(self, logits: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        p = seq.params
        if self._controlled(seq):
            logits = self._process(seq, logits[None])[0]
        if seq.constraint is not None:
            logits = logits.masked_fill(~seq.constraint.allowed().to(logits.device), float("-inf"))
        if is_greedy(p.temperature):
            return logits.argmax(-1)
        probs = logits_to_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        if seq.noise_seed is not None:
            return gumbel_argmax(probs, self._noise(seq, len(seq.tokens), 1)[0])
        return torch.multinomial(probs, 1, generator=seq.generator)[0]

    # ---- the request's sampling controls -------------------------------------------------------------------
    def _constraint(self, response_format: dict | None, resumed: list[int]):
        """The request's grammar state (None for free text), advanced over output generated before a resume.
        Grammars compile once per schema (cached); xgrammar is imported on the first structured request."""
        if not response_format or response_format.get("type") == "text":
            return None
        if self._grammars is None:
            from onspec.actors.grammar import GrammarCompiler
            self._grammars = GrammarCompiler(self.tokenizer, vocab_size=self.vocab_size,
                                             stop_token_ids=sorted(self.stop_ids))
        try:
            c = self._grammars.constraint(response_format)
            c.commit(resumed)
        except ValueError as e:
            raise RequestError(str(e), param="response_format") from None
        return c

    def _stops(self, seq: _Sequence, tok: int) -> bool:
        return tok in self.stop_ids and not seq.params.ignore_eos

    def _controlled(self, seq: _Sequence) -> bool:
        """Whether the request's logits need processing at all: a default request skips it, cost free."""
        return seq.params.penalized or (seq.produced < seq.params.min_tokens and bool(self.stop_ids))

    def _process(self, seq: _Sequence, logits: torch.Tensor, drafts: torch.Tensor | None = None,
                 ahead: list[int] = ()) -> torch.Tensor:
        """The request's controls over logits [P, V] of the positions after its last token: position j's history
        is its output, then ``ahead`` (the drafter's own drafts, while it drafts further), then drafts[:j]."""
        p, dev = seq.params, self.device
        if seq.prompt_ids is None:
            seq.prompt_ids = torch.tensor(seq.tokens[:seq.out_start], dtype=torch.long, device=dev)
            if p.logit_bias:
                seq.bias = torch.zeros(self.vocab_size, device=dev)
                seq.bias[torch.tensor(list(p.logit_bias), device=dev)] = torch.tensor(
                    [float(b) for b in p.logit_bias.values()], device=dev)
        out = torch.tensor(seq.tokens[seq.out_start:] + list(ahead), dtype=torch.long, device=dev)
        return process_logits(
            logits, seq.prompt_ids, out, drafts if drafts is not None else out[:0],
            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
            repetition_penalty=p.repetition_penalty, logit_bias=seq.bias,
            stop_ids=torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=dev),
            # min_tokens counts from the prompt's end, the output (as the kernel sees it) from out_start
            min_tokens=p.min_tokens + seq.prompt_len - seq.out_start)

    def _noise(self, seq: _Sequence, start: int, n: int) -> torch.Tensor:
        return position_gumbel(seq.noise_seed, range(start, start + n), self.vocab_size, self.device)

    @staticmethod
    def _logprobs(logits: torch.Tensor, chosen: list[int], top: int) -> list:
        """Per position: the chosen token's log-probability under the target, and the ``top`` likeliest."""
        lp = torch.log_softmax(logits.float(), -1)
        picked = lp[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
        if top:
            best = lp.topk(top)
            ids, vals = best.indices.tolist(), best.values.tolist()
        else:
            ids, vals = [[]] * len(chosen), [[]] * len(chosen)
        return [(p, list(zip(i, v))) for p, i, v in zip(picked, ids, vals)]

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[int], top: int, chunk: int = 512) -> list:
        """Scoring (evaluation harnesses' log-likelihood tasks): per prompt token, its log-probability under the
        target given the tokens before it, with the ``top`` likeliest there; the first token has none.
        One forward over the prompt in its own cache, so the batch's rows are untouched."""
        cache = RowCache(self.target.model, 1, len(prompt_ids) + 1)
        x = torch.tensor([prompt_ids], device=self.device)
        logits = []
        for s in range(0, len(prompt_ids), chunk):  # bounded activations for long prompts
            h = body_forward(self.target.model, self.target.model.embed_tokens(x[:, s:s + chunk]), cache, 0,
                             torch.tensor([s], device=self.device))
            logits.append(self.target.lm_head(h[0]).float())
        scored = self._logprobs(torch.cat(logits)[:-1], prompt_ids[1:], top) if len(prompt_ids) > 1 else []
        return [(None, [])] + scored

    # ---- drafting ------------------------------------------------------------------------------------------
    def _suffix_draft(self, seq: _Sequence, cap: int) -> SuffixDraft | None:
        """The better of the two indexes' proposals for the sequence's continuation (the paper's rule)."""
        while self.suffix_inbox:
            self.suffix_index.add(self.suffix_inbox.popleft())
        if len(seq.tokens) > seq.indexed:
            seq.suffix.append(seq.tokens[seq.indexed:])
            seq.indexed = len(seq.tokens)
        cap = min(cap, self.suffix_cfg.max_draft)
        if seq.constraint is None:
            return self._suffix_proposal(seq, cap)
        return self._structured_draft(seq, cap)

    def _suffix_proposal(self, seq: _Sequence, cap: int) -> SuffixDraft | None:
        c, best = self.suffix_cfg, None
        for index in (seq.suffix, self.suffix_index):
            d = index.propose(seq.tokens, cap, c.alpha, c.min_prob)
            if d is not None and (best is None or d.score > best.score):
                best = d
        return best

    def _structured_draft(self, seq: _Sequence, cap: int) -> SuffixDraft | None:
        """The indexes' proposal for a row under a grammar, cut before its first token the grammar forbids: that
        token could only be rejected, and it would make the verification wider for nothing. (Drafting the
        grammar's forced tokens, xgrammar's jump-forward, was measured and left out: their tokenization is not
        always the model's, and a forced run stood in for a longer proposal; docs/structured_outputs.md.)"""
        d = self._suffix_proposal(seq, cap)
        if d is None:
            return None
        took = seq.constraint.advance(d.tokens)
        seq.constraint.rewind(took)
        return SuffixDraft(d.tokens[:took], d.probs[:took], d.match_len) if took else None

    def _verify_cost(self, n: int) -> float:
        costs = self.controller.verify_cost
        return costs[n - 1] if n <= len(costs) else costs[-1] * n / len(costs)

    def _suffix_pays(self, d: SuffixDraft) -> bool:
        """Hybrid rule: take the suffix draft while the drafter model's rounds do not pay (DraftController.
        model_speedup: realized against plain rounds, at most Leviathan et al.'s prediction) or suffix rounds
        have realized more; otherwise compare this draft's expected tokens per second (the index's score,
        scaled by how well it has predicted so far) with the model's, both on the costs ``calibrate`` measured."""
        ctl = self.controller
        model = ctl.model_speedup()
        # While model rounds lose to plain decoding, or suffix rounds have done better than them, every proposal
        # is taken, as suffix-only decoding does: its drafts cost no forward, and the trust-scaled score
        # underrates what its rounds really yield here (BENCHMARKS.md, "hybrid from realized rates").
        realized = ctl.realized_speedup("suffix")
        if model <= 1.0 or (realized is not None and realized >= model):
            return True
        suffix_rate = (1.0 + self.suffix_trust * d.score) / self._verify_cost(len(d.tokens) + 1)
        return suffix_rate > model / ctl.verify_cost[0]  # model > 1 here

    def _trimmed(self, d: SuffixDraft) -> SuffixDraft | None:
        """The prefix of a suffix draft with the most expected tokens per second of verification (the index's
        cumulative probabilities against the calibrated forward costs, which jump where the 4-bit kernel starts
        another block of rows; flat costs trim nothing); None when no prefix beats plain decoding. (The index's
        raw probabilities, not scaled by ``suffix_trust``: measured better, BENCHMARKS.md.)"""
        best, rate, expected = 0, 1.0 / self._verify_cost(1), 1.0
        for n, p in enumerate(d.probs, 1):
            expected += p
            if expected / self._verify_cost(n + 1) > rate:
                best, rate = n, expected / self._verify_cost(n + 1)
        return SuffixDraft(d.tokens[:best], d.probs[:best], d.match_len) if best else None

    def _plan(self, seq: _Sequence, cap: int) -> tuple[str, int, SuffixDraft | None]:
        """A row's source this round and, for the model, its draft cap (``cap``: the batch's model cap)."""
        room = min(self.max_context - len(seq.tokens) - 1, seq.budget - seq.produced)
        if not seq.speculate or room <= 0:
            return "none", 0, None
        source = self.spec.source
        if source != "model":
            d = self._suffix_draft(seq, room)
            d = self._trimmed(d) if d is not None else None
            if d is not None and (source == "suffix" or self._suffix_pays(d)):
                return "suffix", len(d.tokens), d
            if source == "suffix":
                return "none", 0, None
        cap = min(cap, room)
        return ("model" if cap > 0 else "none"), cap, None

    def _drafter_forward(self, x: torch.Tensor, cache: RowCache, start: int, lengths: torch.Tensor,
                         feats: torch.Tensor | None, at: torch.Tensor | None = None, head: bool = True):
        """Either drafter kind over rows of ``cache``: (kept-vocabulary logits, predicted features or None).
        ``at`` [b]: only position at[r] of each row goes through the head (logits [b, V]); ``head`` False: no
        position does (a catch-up read is for the cache: over a 100-token backlog the head cost more than the
        layer)."""
        d = self.drafter
        emb = d.body.embed_tokens(x)
        feature = getattr(d, "kind", None) == "feature"
        if feature:
            emb = d.fc(torch.cat([emb, feats.to(emb.dtype) * d.feature_scale.to(emb.dtype)], dim=-1))
        hidden = body_forward(d.body, emb, cache, start, lengths)
        if not head:
            return None, hidden if feature else None
        h = hidden if at is None else hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
        return d.head(h), hidden if feature else None

    def _backlog(self, seq: _Sequence, upto: int) -> tuple[list[int], torch.Tensor | None]:
        """Tokens seq.tokens[dlen:upto] the drafter has not read, with their features (a feature drafter pairs
        token i with the target's feature at i - 1, zeros before the first token)."""
        ids = seq.tokens[seq.dlen:upto]
        if getattr(self.drafter, "kind", None) != "feature":
            return ids, None
        lo = seq.dlen
        prev = seq.feats[max(lo - 1, 0):upto - 1]
        if lo == 0:
            prev = torch.cat([torch.zeros_like(prev[:1]), prev])
        return ids, prev

    def _draft(self, rows: list[tuple[_Sequence, int]]) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Drafter tokens for every (sequence, cap) in ``rows``, all rows in one drafter forward per draft
        position, each stopping on its cap or AdaEDL's entropy bound. Returns {slot: (drafts, q when sampling)}."""
        cache = self._drafter_cache()
        feature = getattr(self.drafter, "kind", None) == "feature"
        kept = self.drafter.kept_ids
        threshold = self.controller.entropy_threshold
        # A long backlog (a new request's prompt) is read alone first, so that one row does not pad the others.
        caught_up = time.perf_counter()
        for seq, _ in rows:
            if len(seq.tokens) - seq.dlen > 8:
                ids, f = self._backlog(seq, len(seq.tokens) - 1)
                lengths = torch.tensor([seq.dlen], device=self.device)
                self._drafter_forward(torch.tensor([ids], device=self.device), cache, seq.slot, lengths,
                                      f[None] if feature else None, head=False)
                seq.dlen += len(ids)
        self._catchup_s = time.perf_counter() - caught_up
        lo = min(s.slot for s, _ in rows)
        b = max(s.slot for s, _ in rows) - lo + 1
        by_slot = {s.slot: (s, cap) for s, cap in rows}
        pending = {s.slot: self._backlog(s, len(s.tokens)) for s, _ in rows}  # the first forward's inputs
        # Structured rows draft under their grammar too (on a copy of its state): a draft the grammar forbids
        # could only be rejected.
        grammars = {s.slot: s.constraint.fork() for s, _ in rows if s.constraint is not None}
        out = {s.slot: ([], []) for s, _ in rows}
        live = set(by_slot)
        step_feats: dict[int, torch.Tensor] = {}
        while live:
            T = max(len(pending[r][0]) for r in live)
            x = torch.zeros(b, T, dtype=torch.long, device=self.device)
            f = torch.zeros(b, T, self.hidden_size, device=self.device) if feature else None
            lengths = torch.tensor([self.active[r].dlen for r in range(lo, lo + b)])  # slot r holds active[r]
            last = [0] * b  # each row's last real position: the only one whose logits are read
            for r in live:
                ids, fr = pending[r]
                x[r - lo, :len(ids)] = torch.tensor(ids)
                last[r - lo] = len(ids) - 1
                if feature:
                    f[r - lo, :len(ids)] = fr
            logits, hidden = self._drafter_forward(x, cache, lo, lengths, f, at=torch.tensor(last, device=self.device))
            picks = []
            for r in sorted(live):
                seq, cap = by_slot[r]
                n = len(pending[r][0])
                seq.dlen += n
                q, tok = self._draft_pick(seq, logits[r - lo].float(), kept, out[r][0], grammars.get(r))
                picks.append((r, q, tok, entropy(q)))
                if feature:
                    step_feats[r] = hidden[r - lo, n - 1:n]
            got = torch.stack([torch.stack([t.to(q.dtype), h]) for _, q, t, h in picks]).tolist()  # one sync
            for (r, q, _, _), (tok, h) in zip(picks, got):
                seq, cap = by_slot[r]
                if threshold is not None and adaedl_should_stop(h, self.spec.adaedl_gamma, threshold):
                    live.discard(r)
                    continue
                if r in grammars:
                    try:
                        grammars[r].commit([int(tok)])
                    except ValueError:  # nothing the grammar allows was in the drafter's vocabulary
                        live.discard(r)
                        continue
                out[r][0].append(int(tok))
                if not is_greedy(seq.params.temperature):
                    out[r][1].append(q)
                if len(out[r][0]) >= cap:
                    live.discard(r)
                else:
                    # drafting ahead feeds the drafter's own predicted feature back in
                    pending[r] = ([int(tok)], step_feats.get(r))
        return {r: (d, torch.stack(qs) if qs else None) for r, (d, qs) in out.items()}

    def _draft_pick(self, seq: _Sequence, logits: torch.Tensor, kept: torch.Tensor, drafts: list[int],
                    grammar=None):
        """(q, token) of one draft position after ``drafts``: the drafter's distribution and its greedy or
        sampled token (under the request's grammar, at its state after ``drafts``, when it has one)."""
        p = seq.params
        processed = self._controlled(seq)
        controlled = processed or grammar is not None
        if controlled:  # q under the target's controls too: more of its drafts survive verification against p
            logits = to_full_logits(logits, kept, self.vocab_size)[None]
            if processed:
                logits = self._process(seq, logits, ahead=drafts)
            logits = logits[0]
            if grammar is not None:
                masked = logits.masked_fill(~grammar.allowed().to(logits.device), float("-inf"))
                # Nothing allowed among the kept ids: left unmasked (the pick is refused by the grammar after).
                logits = torch.where(torch.isfinite(masked).any(), masked, logits)
        if is_greedy(p.temperature):
            q = torch.softmax(logits, -1)
            return q, (q.argmax() if controlled else kept[q.argmax()])
        full = logits if controlled else to_full_logits(logits, kept, self.vocab_size)
        q = logits_to_probs(full, p.temperature, p.top_k, p.top_p, p.min_p)
        if seq.noise_seed is not None:  # the noise the target will use at this position
            return q, gumbel_argmax(q, self._noise(seq, len(seq.tokens) + len(drafts), 1)[0])
        return q, torch.multinomial(q, 1, generator=seq.generator)[0]

    def _observe(self, seq: _Sequence, old_len: int, drafts: list[int], n: int, nxt: int,
                 row: torch.Tensor, source: str = "model") -> None:
        top = torch.log_softmax(row.float(), -1).topk(self.record_topk)
        keep = torch.isfinite(top.values)  # a grammar-masked row may allow fewer tokens than record_topk
        self.round_observer(RoundRecord(
            context=seq.tokens[max(0, old_len - self.record_context):old_len], drafts=drafts, accepted=n,
            target_token=nxt, topk_ids=top.indices[keep].tolist(), topk_logprobs=top.values[keep].tolist(),
            drafter_version=getattr(self.drafter, "version", None), temperature=float(seq.params.temperature),
            source=source, request=seq.tag, constrained=seq.constraint is not None))

    def _ends(self, seq: _Sequence, new: list[int]) -> bool:
        """Whether this round's tokens end the request (what _finish will find)."""
        return any(self._stops(seq, t) for t in new) or seq.produced >= seq.budget \
            or len(seq.tokens) >= self.max_context

    # ---- one verification round ----------------------------------------------------------------------------
    def _round(self, rows: list[_Sequence]) -> None:
        """Draft for every row (its own source and length), verify all rows in one target forward, keep each
        row's accepted prefix and the target's next token."""
        self._use_rows(len(rows))
        started = time.perf_counter()
        cap = self.controller.draft_cap() if any(s.speculate for s in rows) else 0
        plans = {s.slot: self._plan(s, cap) for s in rows}
        if len(rows) > 1 and self.batch_costs and self.spec.cost_aware and self.spec.mode == "adaedl":
            plans = self._fit_width(plans, len(rows))
        model_rows = [(s, plans[s.slot][1]) for s in rows if plans[s.slot][0] == "model"]
        self._catchup_s = 0.0
        drafted = self._draft(model_rows) if model_rows else {}
        inputs = {}
        for s in rows:
            source, _, sd = plans[s.slot]
            if source == "suffix":
                drafts, q = sd.tokens, None
                if not is_greedy(s.params.temperature):  # a deterministic proposal: q is one-hot
                    q = torch.zeros(len(drafts), self.vocab_size, device=self.device)
                    q[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
            else:
                drafts, q = drafted.get(s.slot, ([], None))
            inputs[s.slot] = (drafts, q)
        b = len(rows)  # rows are the active ones, in slots 0..b-1
        T = 1 + max(len(d) for d, _ in inputs.values())
        x = torch.zeros(b, T, dtype=torch.long, device=self.device)
        for s in rows:
            row = [s.tokens[-1]] + inputs[s.slot][0]
            x[s.slot, :len(row)] = torch.tensor(row)
        t0 = time.perf_counter()
        hidden = self._target_rows(x, 0, [s.tlen for s in rows])
        # The head reads the real positions only (padding would cost a vocabulary-wide product each).
        counts = [1 + len(inputs[s.slot][0]) for s in rows]
        flat = torch.cat([hidden[s.slot, :c] for s, c in zip(rows, counts)])
        logits_all = self.target.lm_head(flat).float().split(counts)
        verdicts, served = [], {}
        for s, logits in zip(rows, logits_all):
            drafts, q = inputs[s.slot]
            d = torch.tensor(drafts, device=self.device, dtype=torch.long)
            old_len = len(s.tokens)
            if self._controlled(s):  # verify against the processed p, each position after the drafts before it
                logits = self._process(s, logits, d)
            if s.constraint is not None:  # position j allows what the grammar allows after drafts[:j]
                masks = s.constraint.masks_for(drafts).to(logits.device)
                logits = logits.masked_fill(~masks[:, :logits.shape[-1]], float("-inf"))
                served[s.slot] = logits  # what a record of this row carries: the grammar-masked target
            if is_greedy(s.params.temperature):
                n, nxt = greedy_verify(d, logits)
            else:
                probs = logits_to_probs(logits, s.params.temperature, s.params.top_k, s.params.top_p,
                                        s.params.min_p)
                if s.noise_seed is not None:
                    n, nxt = coupled_verify(d, probs, self._noise(s, old_len, len(drafts) + 1))
                else:
                    n, nxt = rejection_verify(d, q if q is not None else probs[:0], probs, s.generator)
            verdicts.append(torch.stack([n, nxt]))
        verdicts = torch.stack(verdicts).tolist()
        self._observe_cost(b, T, time.perf_counter() - t0)
        for s, logits, (n, nxt) in zip(rows, logits_all, verdicts):
            self._accept(s, plans[s.slot], inputs[s.slot][0], n, nxt, logits, hidden[s.slot], served.get(s.slot))
        if len(rows) == 1 and rows[0].speculate:
            # Less the drafter's catch-up on a long backlog: it is the price of the rounds that did not draft,
            # and charged to a probe it made every probe after a gap look slow, so probes grew rarer and the
            # gaps (and the next probe's catch-up) longer: a drafter that pays at k = 1 was left unused.
            self.controller.observe_round(plans[rows[0].slot][0], 1 + verdicts[0][0],
                                          time.perf_counter() - started - self._catchup_s)

    def _fit_width(self, plans: dict, b: int) -> dict:
        """Cut the rows' drafts to the one width that pays for the whole batch (kernels.draft_length.
        best_batch_width): a long suffix draft in one row would otherwise pad every row to its length."""
        longest = max(len(sd.tokens) if src == "suffix" else cap for src, cap, sd in plans.values())
        if longest == 0:
            return plans
        # A model row's worth per slot is what slots have yielded (drafts AdaEDL stopped included), not alpha.
        alpha, trust = min(self.controller.alpha, self.controller.slot_yield), self.suffix_trust
        gains = []
        for src, cap, sd in plans.values():
            if src == "suffix":
                gains.append([1.0 + trust * sum(sd.probs[:d]) for d in range(len(sd.tokens) + 1)])
            else:
                gains.append([expected_tokens(alpha, d) for d in range(cap + 1)])
        per_row, scale = self._row_costs(b)
        verify = [c * b for c in per_row[:longest + 1]]
        verify += [verify[-1] * (n + 1) / len(verify) for n in range(len(verify), longest + 1)]
        model_cap = max((cap for src, cap, _ in plans.values() if src == "model"), default=0)
        step = self.controller.draft_cost * scale * b
        draft = [step * min(w - 1, model_cap) for w in range(1, longest + 2)]
        width = best_batch_width(gains, verify, draft)
        out = {}
        for slot, (src, cap, sd) in plans.items():
            if src == "suffix" and len(sd.tokens) > width - 1:
                sd = SuffixDraft(sd.tokens[:width - 1], sd.probs[:width - 1], sd.match_len) if width > 1 else None
                src = "suffix" if sd is not None else "none"
            elif src == "model":
                cap = min(cap, width - 1)
                src = "model" if cap > 0 else "none"
            out[slot] = (src, cap if src == "model" else (len(sd.tokens) if src == "suffix" else 0), sd)
        return out

    def _accept(self, seq: _Sequence, plan, drafts: list[int], n: int, nxt: int, logits: torch.Tensor,
                hidden: torch.Tensor, masked: torch.Tensor | None = None) -> None:
        source, cap, sd = plan
        k = len(drafts)
        if source == "model":
            self.controller.observe_slots(cap, n)
        if k == 0:
            source = "none"
        old_len = len(seq.tokens)  # the pending token sat at old_len - 1
        seq.tlen = old_len + n
        self._keep_features(seq, hidden[:n + 1])
        # A feature drafter's cache past the pending token was built on its own predicted features: it re-reads
        # those positions with the target's real ones next round.
        seq.dlen = min(seq.dlen, old_len if getattr(self.drafter, "kind", None) == "feature" else old_len + n)
        new = drafts[:n] + [nxt]
        seq.tokens.extend(new)
        seq.new = new
        if seq.constraint is not None:  # up to the end of sequence, where _finish cuts the output too
            ends = [i for i, t in enumerate(new) if self._stops(seq, t)]
            seq.constraint.commit(new[:ends[0] + 1] if ends else new)
        if seq.params.logprobs is not None:
            seq.logprobs = self._logprobs(logits[:n + 1], new, seq.params.logprobs)
        if seq.speculate:  # a request that saw a swap reports the drafter that finished it
            seq.stats.drafter_version = getattr(self.drafter, "version", None)
        if self.round_observer is not None:
            seq.unrecorded += len(new)
            # The request's last round also sends its tail: with coverage on, every served token reaches the
            # trainer inside some record's window.
            if n < k or (self.record_coverage and (seq.unrecorded >= self.record_coverage
                                                   or self._ends(seq, new))):
                seq.unrecorded = 0
                self._observe(seq, old_len, drafts, n, nxt, (logits if masked is None else masked)[n], source)
        stats = seq.stats
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
