"""`onspec bench serve`: load on the HTTP endpoint (streaming requests, so time to first token is seen) and
the cost of rejection logging, measured as the same greedy load with the stream on and off.

Against ``--url`` only the load is measured (the server's logging switch is not ours to flip). Self-started,
the phases alternate on, off, on, off (one user_config switch each, the replicas keep running), so drift in the
machine's load hits both sides alike; greedy decoding makes both sides generate the very same tokens.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx

from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec
from onspec.cluster.bench.common import percentile, request_for


async def _one(client: httpx.AsyncClient, url: str, model: str, spec: PromptSpec, max_tokens: int) -> dict:
    path, body = request_for(spec, model=model, max_tokens=max_tokens, temperature=0, stream=True,
                             stream_options={"include_usage": True})
    t0 = time.perf_counter()
    ttft, usage, text = None, None, []
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{path}: {chunk['error']['message']}")
            choices = chunk.get("choices") or []
            piece = choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content"))
            if piece:
                text.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "usage": usage, "text": "".join(text)}


async def run_load(url: str, model: str, specs: list[PromptSpec], concurrency: int, requests: int,
                   max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def limited(client, spec):
        async with sem:
            return await _one(client, url, model, spec, max_tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(limited(client, specs[i % len(specs)]) for i in range(requests)))
        wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in rows)
    drafted = sum(r["usage"]["drafted_tokens"] for r in rows)
    accepted = sum(r["usage"]["accepted_tokens"] for r in rows)
    lat, ttft = [r["latency"] for r in rows], [r["ttft"] for r in rows]
    return {"requests": requests, "concurrency": concurrency, "wall_s": round(wall, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 3),
            "requests_per_s": round(requests / wall, 4),
            "latency_p50_s": round(percentile(lat, 50), 3), "latency_p99_s": round(percentile(lat, 99), 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "drafted_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
            "texts": [r["text"] for r in rows]}


def scrape(url: str) -> dict:
    """Totals over all replicas of the counters the bench needs, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=30).text

    def total(name):
        return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M))

    return {"records": total("onspec_stream_records_written_total"),
            "generate_s": total("onspec_engine_generate_seconds_total"),
            "observer_s": total("onspec_stream_observer_seconds_total"),
            "logger_cpu_s": total("onspec_stream_logger_cpu_seconds_total")}


def _merge(phases: list[dict]) -> dict:
    """Phases of one side summed: throughput over their total wall time, latencies as the phases' medians."""
    wall = sum(p["wall_s"] for p in phases)
    tokens = sum(p["completion_tokens"] for p in phases)
    out = {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 3)}
    for k in ("latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "acceptance_rate"):
        out[k] = round(percentile([p[k] for p in phases], 50), 4)
    out["records"] = sum(p.get("records", 0) for p in phases)
    out["logging_cost_pct"] = round(max(p.get("logging_cost_pct", 0.0) for p in phases), 4)
    return out


def bench_levels(cfg: OnspecConfig, specs: list[PromptSpec], levels: list[int], requests: int = 8,
                 max_tokens: int = 32, plots: str | None = None, log=lambda *_: None) -> dict:
    """Throughput and latency of one self-started server at each concurrency level, speculative and target-only
    side by side (one user_config switch between them, the replicas keep running); greedy, so both sides must
    produce the very same texts. Each level sends max(requests, 2 x concurrency) requests, on prompts no earlier
    level (nor the warm-up) used: a repeated prompt would be drafted whole from the suffix index, which real
    traffic does not do (``prompts_reused`` says when the file ran short)."""
    from onspec.cluster.serve import Cluster

    model = cfg.server.served_model_name or cfg.model.name
    # Serving alone (no trainer on the cores), and a suffix stream of its own: the shared one keeps earlier runs'
    # answers, which would be drafted whole.
    cluster = Cluster(cfg.merged(**{"trainer.enabled": False,
                                    "suffix.stream_key": f"onspec:suffix:bench-{uuid.uuid4().hex[:8]}"})).start()
    rows = []
    try:
        log(f"server up at {cluster.url}; warming up")
        asyncio.run(run_load(cluster.url, model, specs[-1:], 1, 1, 8))
        fresh = specs[:-1] if len(specs) > 1 else specs
        used = 0
        for level, c in enumerate(levels):
            n = max(requests, 2 * c)
            mine = [fresh[(used + i) % len(fresh)] for i in range(n)]
            used += n
            side = {}
            # Which side runs first alternates by level: the first run at a new batch size meets its first-time
            # costs, and a side that always ran first would always pay them.
            for spec_on in ((True, False) if level % 2 == 0 else (False, True)):
                cluster.set_speculation(spec_on)
                side[spec_on] = asyncio.run(run_load(cluster.url, model, mine, c, n, max_tokens))
            on, off = side[True], side[False]
            row = {"concurrency": c, "requests": n, "tokens_per_s": on["tokens_per_s"],
                   "target_tokens_per_s": off["tokens_per_s"],
                   "speedup": round(on["tokens_per_s"] / off["tokens_per_s"], 3) if off["tokens_per_s"] else None,
                   "p50_s": on["latency_p50_s"], "p99_s": on["latency_p99_s"], "ttft_p50_s": on["ttft_p50_s"],
                   "target_p50_s": off["latency_p50_s"], "target_p99_s": off["latency_p99_s"],
                   "target_ttft_p50_s": off["ttft_p50_s"], "acceptance_rate": on["acceptance_rate"],
                   "identical": on["texts"] == off["texts"]}
            log(json.dumps(row))
            rows.append(row)
    finally:
        cluster.stop()
    result = {"levels": rows, "max_tokens": max_tokens, "replicas": cfg.server.replicas,
              "max_batch": cfg.server.max_batch, "prompts_reused": used > len(fresh)}
    if plots:
        result["plots"] = plot_levels(rows, plots)
    return result


def plot_levels(rows: list[dict], folder: str) -> list[str]:
    """tokens/s and p99 latency against concurrency, speculative and target-only, as PNG files in ``folder``."""
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    c = [r["concurrency"] for r in rows]
    for name, key, base, unit in (("serve_throughput", "tokens_per_s", "target_tokens_per_s", "tokens/s"),
                                  ("serve_p99", "p99_s", "target_p99_s", "p99 latency (s)")):
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(c, [r[key] for r in rows], "o-", label="speculative")
        ax.plot(c, [r[base] for r in rows], "s--", label="target-only")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.set_xlabel("concurrent requests (one replica)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(folder) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        out.append(str(path))
    return out


def format_levels(result: dict) -> str:
    lines = [f"{'concurrency':>11s} {'tok/s':>8s} {'target':>8s} {'x':>6s} {'p50 s':>7s} {'p99 s':>7s} "
             f"{'ttft p50':>8s} {'identical':>9s}"]
    for r in result["levels"]:
        lines.append(f"{r['concurrency']:>11d} {r['tokens_per_s']:>8.2f} {r['target_tokens_per_s']:>8.2f} "
                     f"{r['speedup'] or 0:>6.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['ttft_p50_s']:>8.2f} "
                     f"{str(r['identical']):>9s}")
    first = result["levels"][0]
    for r in result["levels"][1:]:
        lines.append(f"concurrency {r['concurrency']}: {r['tokens_per_s'] / first['tokens_per_s']:.2f}x the "
                     f"throughput of {first['concurrency']}, p50 {r['p50_s'] / first['p50_s']:.2f}x")
    for p in result.get("plots", []):
        lines.append(f"plot: {p}")
    return "\n".join(lines)


def bench_serve(cfg: OnspecConfig, specs: list[PromptSpec], url: str | None = None, concurrency: int = 2,
                requests: int = 8, max_tokens: int = 32, pairs: int = 2, log=lambda *_: None) -> dict:
    model = cfg.server.served_model_name or cfg.model.name

    def load() -> dict:
        res = asyncio.run(run_load(target, model, specs, concurrency, requests, max_tokens))
        res.pop("texts")
        return res

    if url:
        target = url.rstrip("/")
        return {"url": target, "load": load(), "logging_overhead": None}

    from onspec.cluster.serve import Cluster

    cluster = Cluster(cfg.merged(**{"stream.enabled": True})).start()
    target = cluster.url
    try:
        log(f"server up at {target}; warming up")
        asyncio.run(run_load(target, model, specs, 1, 1, 8))
        phases = {True: [], False: []}
        for enabled in (True, False) * pairs:
            cluster.set_stream_enabled(enabled)
            before = scrape(target)
            result = load()
            time.sleep(0.2)  # let the logger's last batch land before counting
            after = scrape(target)
            result["records"] = int(after["records"] - before["records"])
            gen = after["generate_s"] - before["generate_s"]
            cost = after["observer_s"] - before["observer_s"] + after["logger_cpu_s"] - before["logger_cpu_s"]
            # Direct and far less noisy than the throughput difference: request-path time plus the writer
            # thread's CPU, as a share of generation time.
            result["logging_cost_pct"] = round(cost / gen * 100, 4) if gen else 0.0
            log(f"stream {'on ' if enabled else 'off'}: {json.dumps(result)}")
            phases[enabled].append(result)
    finally:
        cluster.stop()
    on, off = _merge(phases[True]), _merge(phases[False])
    # Each on phase against the off phase right after it; the median resists a burst of outside load.
    paired = [(b["tokens_per_s"] - a["tokens_per_s"]) / b["tokens_per_s"] * 100
              for a, b in zip(phases[True], phases[False]) if b["tokens_per_s"]]
    return {"url": target, "concurrency": concurrency, "requests_per_phase": requests, "max_tokens": max_tokens,
            "replicas": cfg.server.replicas, "pairs": pairs, "stream_on": on, "stream_off": off,
            "logging_overhead_pct": round(percentile(paired, 50), 2),
            "paired_overhead_pct": [round(x, 2) for x in paired],
            "phases": {"on": phases[True], "off": phases[False]}}


def format_report(result: dict) -> str:
    if result.get("stream_on") is None:
        lines = [f"load on {result['url']} (logging overhead needs a self-started server: omit --url)"]
        lines += [f"  {k:22s} {v}" for k, v in result["load"].items()]
        return "\n".join(lines)
    on, off = result["stream_on"], result["stream_off"]
    lines = [f"{'':22s} {'stream on':>12s} {'stream off':>12s}"]
    for k in ("tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "acceptance_rate",
              "records", "logging_cost_pct", "completion_tokens", "wall_s"):
        lines.append(f"{k:22s} {on[k]:>12} {off[k]:>12}")
    lines.append(f"logging overhead: {result['logging_overhead_pct']:+.2f}% of serving throughput "
                 f"(median of {result['pairs']} on/off pairs: {result['paired_overhead_pct']}; concurrency "
                 f"{result['concurrency']}, {result['requests_per_phase']} requests a phase); "
                 f"measured directly: {on['logging_cost_pct']:.3f}% of generation time (request path + writer "
                 f"thread CPU)")
    return "\n".join(lines)
