"""`onspec bench soak`: the whole cluster (replicas, trainer, Redis) under steady closed-loop traffic for a long
time, watching for slow failures: memory that grows, errors that creep in, acceptance that decays.

Every ``sample_s`` it records the resident memory (RSS, psutil) of every process of the cluster (this driver, and
everything it started: Ray's GCS and raylet, the Serve controller and proxy, the ingress and engine replicas, the
trainer actor, the private redis-server), the traffic's running totals and the trainer's state. The report gives,
per process, the first / last / largest RSS and the growth (MiB and %, from the first sample and from the end of
the warm-up, the first third of the run); the error rate; and acceptance and throughput per interval, first third
vs last third. The trainer runs as in production (``trainer.enabled``), with its journal on, so the run also
checks that no acknowledged record was lost.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec

MIB = 1024 * 1024


def process_label(p: psutil.Process) -> str:
    """A stable name for one of the cluster's processes (Ray workers carry their actor in the process title)."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "gone"
    if not cmd:
        return p.name()
    head = cmd[0]
    if head.startswith("ray::"):
        return head[5:].split(".")[0].split(" ")[0] or "ray-worker"
    if "redis-server" in head:
        return "redis-server"
    base = os.path.basename(head)
    if base.startswith("python"):
        script = next((c for c in cmd[1:] if c.endswith(".py")), None)
        return f"python:{os.path.basename(script)}" if script else "python"
    return base


def sample_processes(root: int | None = None) -> dict[str, dict]:
    """{key: {label, pid, rss_mib}} for ``root`` (default: this process) and all its descendants."""
    me = psutil.Process(root or os.getpid())
    out = {}
    for p in [me] + me.children(recursive=True):
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        if rss == 0:  # mid-exit (its memory already released, not yet a zombie): nothing left to watch
            continue
        label = "driver" if p.pid == me.pid else process_label(p)
        if label == "gone":
            continue
        out[f"{label}#{p.pid}"] = {"label": label, "pid": p.pid, "rss_mib": round(rss / MIB, 1)}
    return out


def traffic_totals(load) -> dict:
    rows = load.snapshot()
    done = [r for r in rows if r.outcome == "completed" and r.usage]
    return {"sent": len(rows), "completed": sum(1 for r in rows if r.outcome == "completed"),
            "failed": sum(1 for r in rows if r.outcome in ("failed", "failed_unclear")),
            "hung": sum(1 for r in rows if r.outcome == "hung"),
            "completion_tokens": sum(r.usage.get("completion_tokens", 0) for r in done),
            "drafted": sum(r.usage.get("drafted_tokens", 0) for r in done),
            "accepted": sum(r.usage.get("accepted_tokens", 0) for r in done)}


def _pct(part: float, whole: float) -> float | None:
    return round(part / whole * 100, 2) if whole else None


def soak_report(samples: list[dict], warmup_fraction: float = 1 / 3) -> dict:
    """The figures from the samples (each: {"t_s", "processes": sample_processes(), "traffic": traffic_totals(),
    "trainer": state or None}), in time order."""
    if len(samples) < 2:
        raise ValueError("a soak report needs at least two samples")
    # ---- memory, per process ----
    series: dict[str, list[tuple[float, float]]] = {}
    labels = {}
    for s in samples:
        for key, p in s["processes"].items():
            series.setdefault(key, []).append((s["t_s"], p["rss_mib"]))
            labels[key] = p["label"]
    t_end = samples[-1]["t_s"]
    t_warm = samples[0]["t_s"] + (t_end - samples[0]["t_s"]) * warmup_fraction
    processes = {}
    for key, pts in series.items():
        first, last = pts[0][1], pts[-1][1]
        warm = next((v for t, v in pts if t >= t_warm), last)
        processes[key] = {"label": labels[key], "samples": len(pts), "first_mib": first, "last_mib": last,
                          "max_mib": max(v for _, v in pts), "growth_mib": round(last - first, 1),
                          "growth_pct": _pct(last - first, first),
                          "growth_after_warmup_mib": round(last - warm, 1),
                          "growth_after_warmup_pct": _pct(last - warm, warm),
                          "lived_whole_run": pts[0][0] == samples[0]["t_s"] and pts[-1][0] == t_end}
    whole = [p for p in processes.values() if p["lived_whole_run"]]
    worst = max(whole, key=lambda p: p["growth_after_warmup_mib"], default=None)
    # ---- traffic and acceptance, per interval ----
    intervals = []
    for a, b in zip(samples, samples[1:]):
        ta, tb = a["traffic"], b["traffic"]
        d = {k: tb[k] - ta[k] for k in tb}
        dt = b["t_s"] - a["t_s"]
        intervals.append({"t_s": b["t_s"], "completed": d["completed"], "errors": d["failed"] + d["hung"],
                          "tokens_per_s": round(d["completion_tokens"] / dt, 3) if dt > 0 else None,
                          "acceptance": round(d["accepted"] / d["drafted"], 4) if d["drafted"] else None,
                          "drafted": d["drafted"], "accepted": d["accepted"],
                          "serving_version": (b.get("trainer") or {}).get("serving_version")})
    third = max(1, len(intervals) // 3)

    def pooled(rows):
        drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
        tps = [r["tokens_per_s"] for r in rows if r["tokens_per_s"] is not None]
        return {"acceptance": round(accepted / drafted, 4) if drafted else None, "drafted": drafted,
                "tokens_per_s": round(sum(tps) / len(tps), 3) if tps else None}

    first, last = pooled(intervals[:third]), pooled(intervals[-third:])
    total = samples[-1]["traffic"]
    errors = total["failed"] + total["hung"]
    tr0, tr1 = samples[0].get("trainer") or {}, samples[-1].get("trainer") or {}
    return {
        "duration_s": round(t_end - samples[0]["t_s"], 1), "samples": len(samples),
        "requests": total["sent"], "completed": total["completed"], "failed": total["failed"],
        "hung": total["hung"], "error_rate": round(errors / total["sent"], 5) if total["sent"] else None,
        "memory": {"processes": processes,
                   "max_growth_after_warmup_mib": worst["growth_after_warmup_mib"] if worst else None,
                   "max_growth_after_warmup_process": worst["label"] if worst else None,
                   "total_first_mib": round(sum(p["first_mib"] for p in whole), 1),
                   "total_last_mib": round(sum(p["last_mib"] for p in whole), 1)},
        "acceptance": {"first_third": first["acceptance"], "last_third": last["acceptance"],
                       "change": round(last["acceptance"] - first["acceptance"], 4)
                       if first["acceptance"] is not None and last["acceptance"] is not None else None},
        "tokens_per_s": {"first_third": first["tokens_per_s"], "last_third": last["tokens_per_s"]},
        "trainer": {"steps": (tr1.get("steps") or 0) - (tr0.get("steps") or 0),
                    "records_acked": (tr1.get("records_acked") or 0) - (tr0.get("records_acked") or 0),
                    "promoted": [v for v in tr1.get("promoted", []) if v not in tr0.get("promoted", [])],
                    "alive": tr1.get("alive")},
        "intervals": intervals,
    }


def bench_soak(cfg: OnspecConfig, specs: list[PromptSpec], minutes: float = 30.0, concurrency: int = 2,
               sample_s: float = 30.0, max_tokens: int = 64, replicas: int = 1, timeout_s: float = 120.0,
               port: int | None = None, log=lambda *_: None) -> dict:
    from onspec.cluster.bench.chaos import Chaos
    from onspec.cluster.bench.common import Load, chaos_config, first_api_key
    from onspec.cluster.serve import Cluster

    work = Path(tempfile.mkdtemp(prefix="onspec-soak-"))
    journal = work / "trainer-journal.jsonl"
    # The chaos bench's cluster (own data dir and redis-server), with the production coverage cadence.
    soak_cfg = chaos_config(cfg, work, replicas, port, coverage_every=cfg.stream.coverage_every)
    t_start = time.time()
    log(f"starting the cluster ({replicas} replica(s), trainer, private redis-server) in {work}")
    cluster = Cluster(soak_cfg, trainer_journal=str(journal)).start()
    samples: list[dict] = []
    try:
        model = cfg.server.served_model_name or cfg.model.name
        log(f"up after {time.time() - t_start:.0f} s; {concurrency} clients for {minutes} min, a sample every "
            f"{sample_s:.0f} s")

        def trainer_state():
            try:
                return cluster.trainer_call("state", timeout=30)
            except Exception:  # noqa: BLE001 -- a trainer that does not answer: recorded as None
                return None

        with Load(cluster.url, model, specs, concurrency, max_tokens, timeout_s, label="soak",
                  api_key=first_api_key(cluster.cfg)) as load:
            t0 = time.monotonic()
            end = t0 + minutes * 60
            while True:
                now = time.monotonic()
                s = {"t_s": round(now - t0, 1), "processes": sample_processes(), "traffic": traffic_totals(load),
                     "trainer": trainer_state()}
                samples.append(s)
                mem = sum(p["rss_mib"] for p in s["processes"].values())
                tr = s["traffic"]
                log(f"  t={s['t_s']:.0f}s rss {mem:.0f} MiB in {len(s['processes'])} processes, "
                    f"{tr['completed']} done, {tr['failed'] + tr['hung']} errors, trainer "
                    f"{(s['trainer'] or {}).get('steps')} steps, serving {(s['trainer'] or {}).get('serving_version')}")
                if now >= end:
                    break
                time.sleep(max(0.0, min(sample_s, end - time.monotonic())))  # the sampling cadence
        report = soak_report(samples)
        chaos = Chaos(cluster, journal, specs, model, replicas)
        stream = chaos.drain_and_audit(drain=False)
        report["records_lost"] = stream["records_lost"]
        report["stream"] = stream
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    report.update(minutes=minutes, concurrency=concurrency, sample_s=sample_s, max_tokens=max_tokens,
                  replicas=replicas, wall_s=round(time.time() - t_start, 1))
    return report


def format_report(r: dict) -> str:
    lines = [f"soak: {r['duration_s']:.0f} s, {r['requests']} requests, error rate {r['error_rate']}, "
             f"hung {r['hung']}, records lost {r.get('records_lost')}",
             f"acceptance first third {r['acceptance']['first_third']} -> last third {r['acceptance']['last_third']}"
             f"; tokens/s {r['tokens_per_s']['first_third']} -> {r['tokens_per_s']['last_third']}",
             f"{'process':40s} {'first MiB':>10s} {'last MiB':>10s} {'max MiB':>10s} {'growth':>8s} "
             f"{'after warm-up':>14s}"]
    for key, p in sorted(r["memory"]["processes"].items()):
        lines.append(f"{key:40s} {p['first_mib']:>10.1f} {p['last_mib']:>10.1f} {p['max_mib']:>10.1f} "
                     f"{p['growth_mib']:>+8.1f} {p['growth_after_warmup_mib']:>+14.1f}")
    return "\n".join(lines)
