"""Online distillation (Online Speculative Decoding, arXiv 2310.07177): the drafter learns from the traffic the
service gets, and better versions are promoted to the replicas through the registry.

Data. Each rejection record (docs/stream_schema.md) is a context window that ends where the target corrected the
drafter. Data, not compute, is what is scarce here, so the trainer does not learn from the rejected position
alone: its own frozen copy of the target scores *every* position of the window and the drafter is distilled on
all of them, the rejected one weighted up (``rejected_weight``). Windows go to a bounded replay buffer sampled
with a recency half-life. When no fresh record waits, it trains on-policy (DistillSpec, arXiv 2310.08461):
the drafter continues a recent context by itself and the target scores what it proposed.

Consumer group. Records are read with XREADGROUP and acknowledged (XACK) only after the training step that used
them has been applied; records held back for the promotion gate are acknowledged when they join the held-back
slice. A restarted trainer (same consumer name) first re-reads its own pending records; records pending with
another consumer for ``claim_idle_ms`` are claimed with XAUTOCLAIM (that trainer died).

Loss. ``auto`` follows DistillSpec: forward KL on greedy traffic (it fits the target's mode), TVD on sampled traffic.

Promotion. Every ``promote_every_steps`` steps the working weights become a candidate version; it is promoted
only if its acceptance on the held-back slice (the acceptance the target would give it, greedy or sampled as the
window's request was) beats the serving version's by ``promote_margin``; otherwise it stays a rejected candidate
with the figures as the reason.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import random
import threading
import time
import zlib
from dataclasses import dataclass, field

import redis
import torch

from onspec.actors.deepspeed_engine import clone_drafter, deepspeed_engine
from onspec.actors.hot_swap import serving_load
from onspec.actors.idle_gate import IdleGate
from onspec.actors.feature_drafter import drafter_logits, shift_features
from onspec.actors.models import Drafter
from onspec.actors.registry import DrafterRegistry, RegistryError
from onspec.actors.stream_reader import MalformedRecord, StreamReader, parse_record, stream_ms
from onspec.actors.windows import (ReplayBuffer, Window, dense_teacher_logits, pad_windows, score_windows,
                                   window_features, window_from_record)
from onspec.actors.config import OnspecConfig
from onspec.kernels.losses import divergence

log = logging.getLogger("onspec.trainer")
IDLE_POLL_S = 0.05  # spare capacity: each "is serving busy?" SCANs Redis; the 0.25 s grace needs no faster poll


# ---- the trainer --------------------------------------------------------------------------------------------------
@dataclass
class TrainerStats:
    steps: int = 0
    record_steps: int = 0      # steps on logged windows (fresh + replay)
    onpolicy_steps: int = 0
    records_read: int = 0
    records_acked: int = 0
    records_skipped: int = 0   # unknown schema or trimmed before they were read
    records_malformed: int = 0  # undecodable or out-of-range entries (acknowledged and skipped)
    last_malformed: str = ""   # why the latest one was refused
    held_back: int = 0
    candidates: int = 0
    promoted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    last_loss: float = float("nan")
    last_eval: dict = field(default_factory=dict)
    busy_waits: int = 0
    mid_step_yields: int = 0  # steps that waited for (or gave cores to) a request that arrived mid-step
    train_s: float = 0.0
    tokens_supervised: int = 0  # positions with a loss weight, summed over steps (a replayed window counts again)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["last_loss"] = None if math.isnan(self.last_loss) else round(self.last_loss, 5)
        return d


class OnlineTrainer:
    def __init__(self, cfg: OnspecConfig, target, drafter: Drafter, registry: DrafterRegistry,
                 reader: StreamReader, seed: int = 0):
        self.cfg, self.tc = cfg, cfg.trainer
        self.target, self.registry, self.reader = target, registry, reader
        self.kept = drafter.kept_ids
        self.vocab = int(self.kept.numel())
        drafter.train()
        drafter.requires_grad_(True)
        drafter.body.embed_tokens.requires_grad_(False)  # the target's: shared and frozen
        self.engine = deepspeed_engine(drafter, self.tc)
        self.drafter: Drafter = self.engine.module
        self._feature = getattr(drafter, "kind", "truncated") == "feature"  # EAGLE: reads the target's features
        self.serving_version = getattr(drafter, "version", None) or "base"
        self.serving_drafter = clone_drafter(drafter, target)
        self.fresh: collections.deque[Window] = collections.deque()
        self.replay = ReplayBuffer(self.tc.replay_size, self.tc.replay_half_life)
        self.holdout: collections.deque[Window] = collections.deque(maxlen=self.tc.holdout_size)
        self.steps_since_candidate = 0
        self.rng = random.Random(seed)
        self.stats = TrainerStats()
        self._eval_cache: dict[tuple[str, int], dict] = {}
        self.idle = threading.Event()  # set by run() while it is paused
        self._halt = threading.Event()  # run()'s stop: ends a wait for serving to go idle
        self.idle_gate = IdleGate(self.tc.idle_grace_s)  # busy_duty 0: serving idle long enough to compute
        self._holdout_rev = 0
        self.journal = None  # actors/journal.TrainingJournal: what was done with each record, before its XACK
        self._unacked: list[str] = []  # consumed, but the XACK failed (Redis down): retried with the next one
        # Read and not yet acknowledged. XAUTOCLAIM hands back any record idle for claim_idle_ms, this trainer's
        # own included: one that waits that long in the fresh queue must not be queued (and trained on) twice.
        self._queued: set[str] = set()
        # Throughput and freshness, reported by state(): (monotonic time, steps, tokens supervised) after each
        # step, and how long each fresh record waited in the stream before a step used it.
        self._progress: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=4096)
        self._waits: collections.deque[float] = collections.deque(maxlen=256)
        self._threads = 0
        self._started = time.monotonic()
        self._progress.append((self._started, 0, 0))

    # ---- reading records ----------------------------------------------------------------------------------
    def poll(self, block_ms: int | None = None) -> int:
        """Read records into the fresh queue / held-back slice; returns how many were read. Reading stops while
        enough fresh windows already wait (the rest stays in Redis, unclaimed, for later)."""
        if len(self.fresh) >= 8 * self.tc.batch_windows:
            return 0
        entries = self.reader.read(block_ms)
        skip, hold, bad = [], [], []
        for rid, fields in entries:
            if rid in self._queued:
                continue  # claimed back from ourselves: it is in the fresh queue already
            self.stats.records_read += 1
            try:
                rec = parse_record(fields, self.target.config.vocab_size, self.cfg.model.max_context) \
                    if fields is not None else None
            except MalformedRecord as e:
                bad.append(rid)  # acknowledged below: a broken entry must not come back forever
                self.stats.last_malformed = f"{rid}: {e}"
                if self.stats.records_malformed + len(bad) <= 10 or len(bad) == 1:
                    log.warning("malformed stream record %s skipped: %s", rid, e)
                continue
            if rec is None:
                skip.append(rid)  # trimmed while pending, or a schema this trainer does not know
                continue
            w = window_from_record(rec, rid)
            if self._held_back(rid):
                hold.append(w)
            else:
                self.fresh.append(w)
                self._queued.add(rid)
        if hold:
            score_windows(self.target, self.kept, hold, self.tc.teacher_topk)
            self.holdout.extend(hold)
            self._holdout_rev += 1
            self.stats.held_back += len(hold)
        if self.journal is not None:
            self.journal.write("held", [w.record_id for w in hold])
            self.journal.write("skipped", skip)
            self.journal.write("malformed", bad)
        self._ack([w.record_id for w in hold] + skip + bad)
        self.stats.records_skipped += len(skip)
        self.stats.records_malformed += len(bad)
        return len(entries)

    def _held_back(self, rid: str) -> bool:
        """The gate's share of the traffic. "time": every record of a held-back block of holdout_block_s
        seconds (a stream id starts with its ms timestamp), so that the gate judges whole requests the drafter
        never saw (a request's records overlap: a random split of records would leak them); "record": each
        record on its own."""
        key = rid
        ms = stream_ms(rid)
        if self.tc.holdout_split == "time" and ms is not None:
            key = str(int(ms / (1000 * self.tc.holdout_block_s)))
        return zlib.crc32(key.encode()) % 100 < self.tc.holdout_percent

    def _ack(self, ids: list[str]) -> None:
        ids = self._unacked + [i for i in ids if i]
        try:
            n = self.reader.ack(ids)
        except (redis.RedisError, OSError):
            self._unacked = ids  # used already: acknowledged once Redis answers again, not trained twice
            raise
        self._unacked = []
        self._queued.difference_update(ids)
        self.stats.records_acked += n

    # ---- training -----------------------------------------------------------------------------------------
    def _row_weights(self, w: Window) -> torch.Tensor:
        n = len(w.ids)
        wt = torch.ones(n) if self.tc.window_positions else torch.zeros(n)
        wt[:w.first_row] = 0.0
        if self._feature:
            wt[0] = 0.0  # a feature drafter's first position has no predecessor's feature (zeros): no target
        wt *= w.served is None  # a constrained record teaches at its rejected row only (windows.py, Window)
        if w.rejected_row is not None and w.rejected_row < n:
            wt[w.rejected_row] = self.tc.rejected_weight if self.tc.window_positions else 1.0
        return wt

    def _loss_name(self, greedy: bool) -> str:
        if self.tc.loss != "auto":
            return self.tc.loss
        return "fkl" if greedy else "tvd"

    def train_on(self, windows: list[Window]) -> float:
        """One applied optimizer step on ``windows``; returns the loss."""
        t0 = time.perf_counter()
        for w in windows:  # one window at a time, so that a request arriving meanwhile gets its cores back soon
            score_windows(self.target, self.kept, [w], self.tc.teacher_topk, features=self._feature)
            self._yield_to_serving()
        x, mask = pad_windows(windows, self.kept.device)
        if self._feature:  # teacher-forced on the target's own features: position i gets h_{i-1}
            h = window_features(windows, x.shape[1], x.device, next(self.drafter.parameters()).dtype)
            logits, predicted = self.engine(x, shift_features(h))
            logits = logits[mask].float()
        else:
            logits = self.engine(x)[mask].float()  # [sum T, V'], rows in window order
        teacher = dense_teacher_logits([w.teacher for w in windows], self.vocab).to(logits.device)
        weights = torch.cat([self._row_weights(w) for w in windows]).to(logits.device)
        names = [self._loss_name(w.greedy) for w in windows for _ in w.ids]
        per_row = torch.zeros_like(weights)
        for name in set(names):
            rows = torch.tensor([n == name for n in names], device=logits.device)
            per_row[rows] = divergence(name, teacher[rows], logits[rows], beta=self.tc.jsd_beta)
        loss = (per_row * weights).sum() / weights.sum().clamp_min(1e-6)
        if self._feature and self.tc.feature_loss_weight > 0:
            # EAGLE's feature regression: the predicted feature at row i vs the target's h_i.
            reg = torch.nn.functional.smooth_l1_loss(predicted[mask].float(), h[mask].float(),
                                                     reduction="none").mean(-1)
            loss = loss + self.tc.feature_loss_weight * (reg * weights).sum() / weights.sum().clamp_min(1e-6)
        self._yield_to_serving()
        self.engine.backward(loss)
        self._yield_to_serving()
        self.engine.step()
        self.stats.steps += 1
        self.stats.tokens_supervised += int((weights > 0).sum())
        self._progress.append((time.monotonic(), self.stats.steps, self.stats.tokens_supervised))
        self.steps_since_candidate += 1
        self.stats.last_loss = float(loss.detach())
        self.stats.train_s += time.perf_counter() - t0
        return self.stats.last_loss

    def _sample_replay(self, n: int) -> list[Window]:
        return self.replay.sample(n, self.rng)

    def step_records(self) -> bool:
        """A step on fresh windows (topped up from the replay buffer); their records are acknowledged after it."""
        if not self.fresh:
            return False
        backlog = len(self.fresh) > 4 * self.tc.batch_windows
        take = min(len(self.fresh), self.tc.batch_windows if backlog else max(1, self.tc.fresh_per_step))
        fresh = [self.fresh.popleft() for _ in range(take)]
        batch = fresh + self._sample_replay(self.tc.batch_windows - take)
        if self.journal is not None:
            self.journal.write("begin", [w.record_id for w in fresh])
        self.train_on(batch)
        if self.journal is not None:
            self.journal.write("applied", [w.record_id for w in fresh])
        self._ack([w.record_id for w in fresh])
        now_ms = time.time() * 1000
        for w in fresh:
            ms = stream_ms(w.record_id)
            if ms is not None:  # the record's age when its step was applied
                self._waits.append(max(0.0, now_ms - ms) / 1000)
            self.replay.add(w)
        self.stats.record_steps += 1
        return True

    @torch.inference_mode()
    def _continue(self, prefix: list[int], greedy: bool, features: torch.Tensor | None = None) -> list[int]:
        """The drafter's own continuation of ``prefix`` (greedy, or sampled at temperature 1). A feature drafter
        reads the target's hidden states of the prefix (``features`` [len(prefix), H], else computed here),
        the last prefix token standing for the engine's pending token, then feeds back its own predictions."""
        from transformers import DynamicCache

        cache = DynamicCache()
        x = torch.tensor([prefix], device=self.kept.device)
        out = []
        was_training = self.drafter.training
        self.drafter.eval()
        feat = None
        if self._feature:
            dtype = next(self.drafter.parameters()).dtype
            h = features[None] if features is not None else self.target.model(input_ids=x).last_hidden_state
            feat = shift_features(h.to(device=x.device, dtype=dtype))
        for _ in range(self.tc.onpolicy_tokens):
            if self._feature:
                logits, hidden = self.drafter(x, feat, cache)
                logits, feat = logits[0, -1].float(), hidden[:, -1:]
            else:
                logits = self.drafter(x, cache)[0, -1].float()
            i = int(logits.argmax()) if greedy else int(torch.multinomial(torch.softmax(logits, -1), 1))
            tok = int(self.kept[i])
            out.append(tok)
            x = torch.tensor([[tok]], device=self.kept.device)
        self.drafter.train(was_training)
        return out

    def step_onpolicy(self) -> bool:
        """DistillSpec's on-policy data: recent contexts continued by the drafter, scored by the target."""
        if not self.replay:
            return False
        windows = []
        # (Not a constrained window's: the drafter's free continuation would ignore the request's grammar.)
        for src in [w for w in self._sample_replay(self.tc.batch_windows) if w.served is None]:
            cut = self.rng.randint(min(8, len(src.ids) - 1), len(src.ids) - 1)
            prefix = src.ids[:cut + 1]
            known = src.teacher.features[:cut + 1] if src.teacher is not None and src.teacher.features is not None \
                else None  # the target's hidden states of the prefix, from scoring the source window
            windows.append(Window(ids=prefix + self._continue(prefix, src.greedy, known), rejected_row=None,
                                  greedy=src.greedy, label=src.label, first_row=len(prefix) - 1))
            self._yield_to_serving()
        if windows:
            self.train_on(windows)
            self.stats.onpolicy_steps += 1
        return bool(windows)

    # ---- evaluation and promotion -------------------------------------------------------------------------
    @torch.inference_mode()
    def acceptance(self, drafter: Drafter, windows: list[Window], skip_rows: int = 4) -> dict:
        """The acceptance the target would give ``drafter`` at every position of ``windows`` (teacher-forced):
        greedy = the drafter's top token is the target's; sampled = sum_v min(p(v), q(v)) (Leviathan et al.),
        over the target's top-k kept tokens (a lower bound). ``gate`` weighs each window by its own mode."""
        was_training = drafter.training
        drafter.eval()
        feature = getattr(drafter, "kind", "truncated") == "feature"
        score_windows(self.target, self.kept, windows, self.tc.teacher_topk, features=feature)
        g_sum = s_sum = gate_sum = 0.0
        n = 0
        for i in range(0, len(windows), 8):
            chunk = windows[i:i + 8]
            x, _ = pad_windows(chunk, self.kept.device)
            feats = shift_features(window_features(chunk, x.shape[1], x.device, next(drafter.parameters()).dtype)) \
                if feature else None
            q = torch.softmax(drafter_logits(drafter, x, feats).float(), -1)
            for r, w in enumerate(chunk):
                rows = slice(min(skip_rows, len(w.ids) - 1), len(w.ids))
                t = w.teacher
                g = (self.kept[q[r, rows].argmax(-1)] == t.argmax[rows]).float()
                s = torch.minimum(t.probs[rows], q[r, rows].gather(-1, t.idx[rows])).sum(-1)
                g_sum, s_sum = g_sum + float(g.sum()), s_sum + float(s.sum())
                gate_sum += float((g if w.greedy else s).sum())
                n += g.numel()
        drafter.train(was_training)
        n = max(n, 1)
        return {"greedy": round(g_sum / n, 4), "sampled": round(s_sum / n, 4), "gate": round(gate_sum / n, 4),
                "positions": n, "windows": len(windows)}

    def _serving_acceptance(self) -> dict:
        key = (self.serving_version, self._holdout_rev)
        if key not in self._eval_cache:
            self._eval_cache = {key: self.acceptance(self.serving_drafter, list(self.holdout))}
        return self._eval_cache[key]

    def follow_registry(self) -> None:
        """An operator promoted or rolled back another version: continue training from it."""
        version = self.registry.serving()
        if version is None or version == self.serving_version:
            return
        try:
            served = self.registry.load(version, self.target)
        except RegistryError as e:
            log.error("cannot follow drafter %s: %s", version, e)
            return
        if served.kind != self.drafter.kind or served.layers != self.drafter.layers:
            log.error("cannot follow drafter %s: it is a %s drafter of %d layers, this trainer trains a %s one "
                      "of %d", version, served.kind, served.layers, self.drafter.kind, self.drafter.layers)
            return
        self.serving_version, self.serving_drafter = version, served
        with torch.no_grad():
            self.drafter.load_state_dict(served.own_state_dict(), strict=False)
        self.steps_since_candidate = 0
        log.info("following operator's drafter %s", version)

    def maybe_promote(self, force: bool = False) -> dict | None:
        """Register the working weights as a candidate and promote it if it beats the serving version."""
        if not force and (self.steps_since_candidate < self.tc.promote_every_steps
                          or len(self.holdout) < self.tc.min_holdout):
            return None
        if not self.holdout:
            return None
        self.follow_registry()
        windows = list(self.holdout)
        cand = self.acceptance(self.drafter, windows)
        serv = self._serving_acceptance()
        evaluation = {"candidate": cand, "serving": serv, "serving_version": self.serving_version,
                      "steps": self.stats.steps, "at": time.time()}
        manifest = self.registry.register(self.drafter, parent=self.serving_version,
                                          extra={"trainer": {"steps": self.stats.steps, "loss": self.tc.loss}})
        version = manifest["version"]
        self.stats.candidates += 1
        self.steps_since_candidate = 0
        gain = cand["gate"] - serv["gate"]
        figures = (f"held-back acceptance {cand['gate']:.4f} vs {serv['gate']:.4f} for {self.serving_version} "
                   f"({cand['windows']} windows, {cand['positions']} positions)")
        if gain >= self.tc.promote_margin:
            self.registry.record_evaluation(version, evaluation)
            self.registry.promote(version, reason=f"gate passed: {figures}")
            self.serving_version = version
            self.serving_drafter = clone_drafter(self.drafter, self.target)
            self.serving_drafter.version = version
            self.stats.promoted.append(version)
            decision = "promoted"
        else:
            self.registry.record_evaluation(
                version, evaluation, rejected_reason=f"gate refused: {figures}, needs +{self.tc.promote_margin}")
            self.stats.rejected.append(version)
            decision = "rejected"
            self.registry.prune(self.cfg.registry.keep_rejected)
        self.stats.last_eval = {"version": version, "decision": decision, **evaluation}
        log.info("candidate %s %s: %s", version, decision, figures)
        return self.stats.last_eval

    # ---- the loop -----------------------------------------------------------------------------------------
    def serving_busy(self) -> bool:
        if not self.tc.yield_to_serving:
            return False
        try:
            return serving_load(self.reader.r, self.cfg.registry.load_key_prefix)["in_flight"] > 0
        except (redis.RedisError, OSError):
            return False

    def step(self, allow_onpolicy: bool = True) -> str | None:
        """One unit of work: a step on records if any wait, else (idle) an on-policy step."""
        if self.step_records():
            return "records"
        if allow_onpolicy and self.tc.onpolicy and self.step_onpolicy():
            return "onpolicy"
        return None

    def run(self, stop: threading.Event, paused: threading.Event | None = None) -> None:
        self._halt = stop
        try:
            self._run(stop, paused)
        finally:
            self._halt = threading.Event()  # a step called directly after run() ends still waits for serving

    def _run(self, stop: threading.Event, paused: threading.Event | None) -> None:
        waiting = False
        self.idle_gate.reset()
        while not stop.is_set():
            if paused is not None and paused.is_set():
                self.idle.set()
                self.idle_gate.reset()
                stop.wait(0.1)
                continue
            self.idle.clear()
            try:
                busy = self.serving_busy()
                if self.tc.busy_duty == 0 and not self.idle_gate.open(busy):
                    # Spare capacity only: nothing starts (not even reading, which scores held-back windows)
                    # while a replica has requests in flight, or until serving has been idle for the grace.
                    self.stats.busy_waits += busy and not waiting
                    waiting = waiting or busy
                    stop.wait(IDLE_POLL_S)
                    continue
                waiting = False
                self._use_threads(busy)
                read = self.poll(block_ms=None if (self.fresh or (self.replay and not busy)) else 500)
                t0 = time.perf_counter()
                # On-policy steps only while serving is idle: they use the CPU serving would need.
                did = self.step(allow_onpolicy=not busy)
                spent = time.perf_counter() - t0
                self.maybe_promote()
            except (redis.RedisError, OSError) as e:
                log.warning("redis unreachable (%s); retrying", e)
                stop.wait(1.0)
                continue
            if did and busy and 0 < self.tc.busy_duty < 1.0:
                # Yield: compute at most busy_duty of the wall time while replicas have requests in flight.
                self.stats.busy_waits += 1
                stop.wait(spent * (1 - self.tc.busy_duty) / self.tc.busy_duty)
            elif not did and not read:
                stop.wait(0.1)

    def _yield_to_serving(self) -> None:
        """Called between the parts of a step. A step begun on every core while serving was idle used to keep
        them until it ended, and a request arriving meanwhile ran beside it on shared cores (the trainer-running
        p99 in BENCHMARKS.md): now, at its next part, the step waits until no request is in flight
        (``busy_duty`` 0), or goes on with ``threads``."""
        if self.tc.busy_duty == 0:
            if self.serving_busy():
                self.stats.mid_step_yields += 1
                self.idle_gate.reset()
                while not self.idle_gate.open(self.serving_busy()) and not self._halt.wait(IDLE_POLL_S):
                    pass
        elif self._threads and self._threads != self.tc.threads and self.serving_busy():
            self._use_threads(True)
            self.stats.mid_step_yields += 1

    def _use_threads(self, busy: bool) -> None:
        """The serving replicas' CPU comes first: ``threads`` while they have requests in flight, every core
        (``idle_threads``) while they have none."""
        n = self.tc.threads if busy else (self.tc.idle_threads or os.cpu_count() or 1)
        if n != self._threads:
            torch.set_num_threads(n)
            self._threads = n

    def rates(self, window_s: float = 300.0) -> dict:
        """Steps and supervised tokens per minute over the last ``window_s`` seconds of steps, and how long
        records waited in the stream before they were trained on (the last 256)."""
        out = {"steps_per_min": 0.0, "tokens_supervised_per_min": 0.0, "record_wait_p50_s": None,
               "record_wait_max_s": None, "threads": self._threads}
        now = time.monotonic()
        elapsed = min(window_s, now - self._started)
        if elapsed > 0:
            # the last entry before the window (the start's (t, 0, 0) at first, the oldest kept once cut)
            _, s0, k0 = next((p for p in reversed(self._progress) if p[0] < now - window_s), self._progress[0])
            _, s1, k1 = self._progress[-1]
            out["steps_per_min"] = round((s1 - s0) * 60 / elapsed, 2)
            out["tokens_supervised_per_min"] = round((k1 - k0) * 60 / elapsed, 1)
        if self._waits:
            waits = sorted(self._waits)
            out["record_wait_p50_s"] = round(waits[len(waits) // 2], 2)
            out["record_wait_max_s"] = round(waits[-1], 2)
        return out

    def state(self) -> dict:
        return {"serving_version": self.serving_version, "fresh": len(self.fresh), "replay": len(self.replay),
                "holdout": len(self.holdout), **self.stats.as_dict(), **self.rates()}
