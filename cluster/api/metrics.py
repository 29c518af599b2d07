"""Prometheus metrics of the ingress (prometheus_client, a private registry): the requests that pass through it,
and at each scrape what it fetches from the replicas, the trainer and the drafter registry."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MAX_METRIC_LABELS = 32  # distinct `label` values given their own metric series; the rest count as "other"
MAX_METRIC_VERSIONS = 32  # distinct drafter versions given their own series; later ones count as "other"
REPLICA_STALE_S = 300.0  # a replica not heard from for this long is left out of the drafter-version gauge
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape does not wait longer than this for a replica, the trainer or Redis


def _bounded(value: str, seen: set[str], cap: int) -> str:
    """``value``, or "other" once ``cap`` distinct values have their own series (a client cannot blow up the
    number of series by sending a new label with every request)."""
    if value in seen or len(seen) < cap:
        seen.add(value)
        return value
    return "other"


def verification_steps(usage: dict) -> int:
    """Target forward passes of a request (prefill included), recovered from usage's rounded tokens_per_step:
    exact up to ~8000 steps, far beyond max_tokens_limit's default."""
    tps = usage.get("tokens_per_step") or 0
    return round(usage["completion_tokens"] / tps) if tps > 0 else 0


class Metrics:
    """A private prometheus_client registry of what passes through this ingress, plus what the ingress fetches
    at each scrape: the engine replicas' logger counters and drafter versions (they also ride along with every
    finished request), the trainer's state and the registry's serving version and history."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("onspec_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("onspec_request_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.ttft = Histogram("onspec_time_to_first_token_seconds", "time to the first token (streams)",
                              registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32))
        self.prompt_tokens = Counter("onspec_prompt_tokens", "prompt tokens", ["label"], registry=r)
        self.completion_tokens = Counter("onspec_completion_tokens", "generated tokens", ["label"], registry=r)
        self.drafted = Counter("onspec_spec_draft_tokens", "drafted tokens", ["label"], registry=r)
        self.accepted = Counter("onspec_spec_accepted_tokens", "accepted draft tokens", ["label"], registry=r)
        # Structured requests (response_format, tool calls) verify against a grammar-masked target: their
        # acceptance is counted apart so that it is not mistaken for the drafter's on free text.
        self.output_drafted = Counter("onspec_spec_draft_tokens_by_output", "drafted tokens by output: "
                                      "structured (grammar-masked) or text", ["output"], registry=r)
        self.output_accepted = Counter("onspec_spec_accepted_tokens_by_output", "accepted draft tokens by output: "
                                       "structured (grammar-masked) or text", ["output"], registry=r)
        self.cancelled = Counter("onspec_requests_cancelled", "streams the client left early", registry=r)
        self.retried = Counter("onspec_requests_retried", "requests sent again to another replica after theirs "
                                                          "failed before streaming a token", registry=r)
        self._per_version(r)
        self.replicas: dict[str, dict] = {}
        self.seen: dict[str, float] = {}  # replica id -> when it last reported
        self.trainer: dict | None = None  # the trainer's state at the last scrape (None: no trainer answered)
        self.drafters: dict | None = None  # {"serving", "history"} from the registry at the last scrape
        self._labels: set[str] = set()
        self._versions: set[str] = set()
        r.register(self)

    def _per_version(self, r: CollectorRegistry) -> None:
        # The drift views: the same figures split by the drafter version that served the request.
        by = ["drafter_version", "label"]
        self.served = Counter("onspec_served_requests", "requests answered in full", by, registry=r)
        self.generated = Counter("onspec_generated_tokens", "generated tokens", by, registry=r)
        self.drafted_by = Counter("onspec_drafted_tokens", "drafted tokens", by, registry=r)
        self.accepted_by = Counter("onspec_accepted_tokens", "accepted draft tokens", by, registry=r)
        self.steps = Counter("onspec_verification_steps", "target forward passes, prefill included (decoding "
                             "with the target alone takes one per generated token)", by, registry=r)
        self.acceptance = Histogram("onspec_request_acceptance_rate", "accepted / drafted of one request "
                                    "(requests that drafted nothing are not observed)", ["drafter_version"],
                                    registry=r, buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.tokens_per_step = Histogram("onspec_request_tokens_per_step", "generated tokens per target forward "
                                         "pass of one request", ["drafter_version"], registry=r,
                                         buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8))
        self.source_rounds = Counter("onspec_draft_source_rounds", "verification rounds by draft source (model: "
                                     "the drafter; suffix: text seen before; none: no draft)", ["source"],
                                     registry=r)
        self.source_drafted = Counter("onspec_draft_source_drafted_tokens", "drafted tokens by draft source",
                                      ["source"], registry=r)
        self.source_accepted = Counter("onspec_draft_source_accepted_tokens", "accepted tokens by draft source",
                                       ["source"], registry=r)
        self.draft_length = Histogram("onspec_request_draft_length", "mean draft length chosen per verification "
                                      "round of one request (0: the controller did not draft)",
                                      ["drafter_version"], registry=r,
                                      buckets=(0, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 12, 16))

    def label(self, label: str | None) -> str:
        return _bounded(label, self._labels, MAX_METRIC_LABELS) if label else ""

    def version(self, version: str | None) -> str:
        return _bounded(version, self._versions, MAX_METRIC_VERSIONS) if version else "none"

    def finished(self, label: str | None, usage: dict, replica: dict | None,
                 structured: bool = False) -> tuple[str, str]:
        """Count a finished request; returns the (drafter_version, label) series it went to."""
        lab, ver = self.label(label), self.version(usage.get("drafter_version"))
        output = "structured" if structured else "text"
        self.output_drafted.labels(output).inc(usage["drafted_tokens"])
        self.output_accepted.labels(output).inc(usage["accepted_tokens"])
        self.prompt_tokens.labels(lab).inc(usage["prompt_tokens"])
        self.completion_tokens.labels(lab).inc(usage["completion_tokens"])
        self.drafted.labels(lab).inc(usage["drafted_tokens"])
        self.accepted.labels(lab).inc(usage["accepted_tokens"])
        steps = verification_steps(usage)
        self.served.labels(ver, lab).inc()
        self.generated.labels(ver, lab).inc(usage["completion_tokens"])
        self.drafted_by.labels(ver, lab).inc(usage["drafted_tokens"])
        self.accepted_by.labels(ver, lab).inc(usage["accepted_tokens"])
        self.steps.labels(ver, lab).inc(steps)
        for source, figures in (usage.get("draft_sources") or {}).items():
            if source in ("model", "suffix", "none"):
                self.source_rounds.labels(source).inc(figures["rounds"])
                self.source_drafted.labels(source).inc(figures["drafted"])
                self.source_accepted.labels(source).inc(figures["accepted"])
        if usage["drafted_tokens"]:
            self.acceptance.labels(ver).observe(usage["accepted_tokens"] / usage["drafted_tokens"])
        if steps:
            self.tokens_per_step.labels(ver).observe(usage["completion_tokens"] / steps)
        if steps > 1:  # the rounds after prefill each chose a draft length
            self.draft_length.labels(ver).observe(usage["drafted_tokens"] / (steps - 1))
        if replica:
            self.replica(replica)
        return ver, lab

    def replica(self, rep: dict) -> None:
        self.replicas[rep["replica_id"]] = rep
        self.seen[rep["replica_id"]] = time.time()

    def live_replicas(self) -> list[dict]:
        cutoff = time.time() - REPLICA_STALE_S
        return [rep for rid, rep in sorted(self.replicas.items()) if self.seen.get(rid, 0) >= cutoff]

    def collect(self):
        yield from self._logger_families()
        yield from self._replica_families()
        yield from _trainer_families(self.trainer)
        yield from _registry_families(self.drafters)

    def _logger_families(self):
        written = CounterMetricFamily("onspec_stream_records_written", "records Redis acknowledged",
                                      labels=["replica"])
        dropped = CounterMetricFamily("onspec_stream_records_dropped", "records dropped (buffer full)",
                                      labels=["replica"])
        errors = CounterMetricFamily("onspec_stream_write_errors", "failed stream writes", labels=["replica"])
        pending = GaugeMetricFamily("onspec_stream_records_pending", "records waiting for Redis",
                                    labels=["replica"])
        gen = CounterMetricFamily("onspec_engine_generate_seconds", "time spent generating", labels=["replica"])
        cpu = CounterMetricFamily("onspec_stream_logger_cpu_seconds", "CPU time of the stream writer thread",
                                  labels=["replica"])
        obs = CounterMetricFamily("onspec_stream_observer_seconds", "part of it spent handing records to the "
                                  "logger (the logging cost on the request path)", labels=["replica"])
        for rid, rep in self.replicas.items():
            gen.add_metric([rid], rep.get("generate_s", 0.0))
            obs.add_metric([rid], rep.get("observer_s", 0.0))
            log = rep.get("logger")
            if log:
                written.add_metric([rid], log["written"])
                dropped.add_metric([rid], log["dropped"])
                errors.add_metric([rid], log["errors"])
                pending.add_metric([rid], log["pending"])
                cpu.add_metric([rid], log.get("cpu_s", 0.0))
        yield from (written, dropped, errors, pending, gen, obs, cpu)

    def _replica_families(self):
        info = GaugeMetricFamily("onspec_replica_drafter_info", "1 for the drafter version each engine replica "
                                 "serves (as it last reported)", labels=["replica", "drafter_version"])
        busy = GaugeMetricFamily("onspec_replica_in_flight", "requests running or waiting on each engine replica "
                                 "(as it last reported)", labels=["replica"])
        swaps = CounterMetricFamily("onspec_replica_drafter_swaps", "drafter hot swaps each engine replica took",
                                    labels=["replica"])
        for rep in self.live_replicas():
            rid = rep["replica_id"]
            info.add_metric([rid, str(rep.get("drafter_version") or "none")], 1.0)
            busy.add_metric([rid], rep.get("in_flight", 0))
            swaps.add_metric([rid], rep.get("drafter_swaps", 0))
        yield from (info, busy, swaps)


def _trainer_families(state: dict | None):
    up = GaugeMetricFamily("onspec_trainer_up", "1 when the online trainer answered at this scrape")
    up.add_metric([], 1.0 if state else 0.0)
    yield up
    if not state:
        return
    counters = (("steps", "onspec_trainer_steps", "training steps"),
                ("records_read", "onspec_trainer_records_read", "stream records read"),
                ("records_acked", "onspec_trainer_records_consumed",
                 "stream records trained on (or held back for the gate) and acknowledged"),
                ("records_skipped", "onspec_trainer_records_skipped", "records skipped (unknown schema, trimmed)"),
                ("records_malformed", "onspec_trainer_records_malformed",
                 "malformed records skipped (undecodable or out-of-range fields)"),
                ("busy_waits", "onspec_trainer_paused_for_load", "times the trainer paused for serving load"),
                ("candidates", "onspec_trainer_candidates", "candidate versions registered"),
                ("train_s", "onspec_trainer_train_seconds", "time spent in training steps"),
                ("tokens_supervised", "onspec_trainer_tokens_supervised",
                 "positions trained on (every position of each window, replays included)"))
    for key, name, doc in counters:
        yield CounterMetricFamily(name, doc, value=float(state.get(key) or 0))
    gate = CounterMetricFamily("onspec_trainer_gate_decisions", "promotion gate decisions on candidates",
                               labels=["decision"])
    gate.add_metric(["promoted"], len(state.get("promoted") or ()))
    gate.add_metric(["rejected"], len(state.get("rejected") or ()))
    yield gate
    if state.get("last_loss") is not None:
        yield GaugeMetricFamily("onspec_trainer_loss", "loss of the last training step", value=state["last_loss"])
    yield GaugeMetricFamily("onspec_trainer_paused", "1 while an operator has paused the trainer",
                            value=1.0 if state.get("paused") else 0.0)
    yield GaugeMetricFamily("onspec_trainer_replay_windows", "windows in the replay buffer",
                            value=float(state.get("replay") or 0))
    if state.get("record_wait_p50_s") is not None:
        yield GaugeMetricFamily("onspec_trainer_record_wait_seconds", "median time a record waited in the stream "
                                "before a training step used it (last 256 records)", value=state["record_wait_p50_s"])


def _registry_families(drafters: dict | None):
    if drafters is None:  # no Redis, or it did not answer: better no series than wrong ones
        return
    serving = GaugeMetricFamily("onspec_drafter_serving_info", "1 for the drafter version the registry says "
                                "every replica should serve", labels=["drafter_version"])
    if drafters["serving"]:
        serving.add_metric([drafters["serving"]], 1.0)
    yield serving
    history = drafters["history"]
    yield CounterMetricFamily("onspec_drafter_promotions", "promotions in the registry's history (by the "
                              "trainer's gate or an operator)",
                              value=sum(h.get("action") == "promote" for h in history))
    yield CounterMetricFamily("onspec_drafter_rollbacks", "rollbacks in the registry's history",
                              value=sum(h.get("action") == "rollback" for h in history))
    if history:
        yield GaugeMetricFamily("onspec_drafter_last_change_timestamp_seconds", "when the serving version last "
                                "changed (Unix time)", value=float(history[-1].get("at") or 0))
