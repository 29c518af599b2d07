"""The `onspec` command."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from onspec.cluster.config import OnspecConfig


class CLIError(Exception):
    pass


def _config(args) -> OnspecConfig:
    cfg = OnspecConfig.from_yaml(args.config) if getattr(args, "config", None) else OnspecConfig()
    return cfg.merged(**{
        "data_dir": getattr(args, "data_dir", None),
        "drafter.checkpoint": getattr(args, "drafter_checkpoint", None),
        "speculation.source": (getattr(args, "drafter", None) or [None])[-1],
        "drafter.kind": getattr(args, "drafter_kind", None),
        "drafter.layers": getattr(args, "layers", None),
        "drafter.vocab_keep": getattr(args, "vocab_keep", None),
        "speculation.mode": getattr(args, "mode", None),
        "speculation.max_draft": getattr(args, "max_draft", None),
        "speculation.fixed_k": getattr(args, "fixed_k", None),
    })


def _engine(cfg: OnspecConfig):
    from onspec.actors.engine import SpeculativeEngine
    return SpeculativeEngine.from_config(cfg)


def cmd_generate(args) -> int:
    from onspec.actors.engine import RequestError, SamplingParams
    from onspec.cluster.prompts import read_prompts

    specs = read_prompts(args.prompts_file)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    params.validate()
    engine = _engine(_config(args))
    encoded = []
    for n, spec in enumerate(specs, start=1):
        ids = engine.encode(spec.prompt, spec.messages)
        try:
            engine.check_prompt(ids)
        except RequestError as e:
            raise CLIError(f"{args.prompts_file}: prompt {spec.id!r} (entry {n}): {e}") from None
        encoded.append(ids)
    for spec, ids in zip(specs, encoded):
        g = engine.generate(ids, params, speculate=not args.no_speculate)
        if args.json:
            print(json.dumps({"id": spec.id, "text": g.text, "token_ids": g.token_ids, "stats": g.stats.as_dict()}),
                  flush=True)
        else:
            s = g.stats
            print(f"--- {spec.id}  ({s.completion_tokens} tokens, {s.tokens_per_s:.1f} tok/s, acceptance "
                  f"{s.acceptance_rate:.2f}, {s.tokens_per_step:.2f} tokens/step, drafter {s.drafter_version})")
            print(g.text, flush=True)
    return 0


def cmd_bench_quality(args) -> int:
    from onspec.cluster.bench_quality import bench_quality, format_report
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    if args.tokens < args.window or args.window < 2 or args.max_tokens < 1:
        raise CLIError("--tokens must be at least --window, --window at least 2, --max-tokens at least 1")
    specs = read_prompts(args.prompts_file or packaged_prompts())
    log = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    result = bench_quality(_config(args), specs, args.precision or ["float32", "bfloat16"], tokens=args.tokens,
                           window=args.window, max_tokens=args.max_tokens, log=log)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_bench_decode(args) -> int:
    from onspec.cluster.bench import bench_decode
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    cfg = _config(args)
    engine = _engine(cfg)
    log = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True)) if not args.json else (lambda *_: None)
    sources = tuple(dict.fromkeys(args.drafter or [engine.spec.source]))
    drafters = _compare_drafters(args.compare_drafter or [], engine, cfg)
    result = bench_decode(engine, specs, args.max_tokens, repeats=args.repeats, sources=sources,
                          prompt_lookup=args.prompt_lookup, log=log, drafters=drafters)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k not in ("prompts", "sources"):
                print(f"{k:28s} {v}")
        for src, figures in result["sources"].items():
            print(f"{'source ' + src:28s} {json.dumps(figures)}")
        for name, figures in result.get("drafters", {}).items():
            print(f"{'drafter ' + name:28s} {json.dumps(figures)}")
    return 0


def _compare_drafters(specs: list[str], engine, cfg: OnspecConfig) -> dict:
    """``--compare-drafter`` values as {name: drafter}: a kind ("truncated", "feature": the base drafter of that
    kind, as configured: the shipped pretrained one where it fits), "derived-KIND" (that kind derived from the
    target, untrained), or a drafter checkpoint directory (named by its version)."""
    from onspec.actors.checkpoint import CheckpointError, drafter_kinds, load_checkpoint
    from onspec.actors.models import make_drafter

    out = {}
    for spec in specs:
        kind = spec.removeprefix("derived-")
        if kind in drafter_kinds():
            base = "derived" if spec.startswith("derived-") else cfg.drafter.base
            d = make_drafter(engine.target, cfg.drafter.model_copy(update={"kind": kind, "base": base}),
                             always_keep=tuple(sorted(engine.stop_ids)))
            name = spec
        else:
            try:
                d, manifest = load_checkpoint(Path(spec), engine.target)
            except (CheckpointError, OSError) as e:
                raise CLIError(f"--compare-drafter {spec}: {e}") from None
            name = f"{manifest.get('version') or Path(spec).name}"
        if name in out or name in ("target", "model", "suffix", "hybrid"):  # keys of the result's other modes
            name = f"{name}@{len(out) + 1}"
        out[name] = d
    return out


def cmd_bench_forward(args) -> int:
    from onspec.actors.models import load_target
    from onspec.cluster.bench import bench_forward

    cfg = _config(args)
    target, _ = load_target(cfg.model, cfg.data_dir)
    print(json.dumps(bench_forward(target, reps=args.reps)))
    return 0


def cmd_drafter_distill(args) -> int:
    from onspec.actors.checkpoint import save_checkpoint
    from onspec.actors.models import load_target, make_drafter, stop_token_ids
    from onspec.actors.offline_distill import corpus_cached, distill
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    cfg = _config(args)
    specs = read_prompts(args.prompts_file or packaged_prompts("distill_prompts.jsonl"))
    target, tok = load_target(cfg.model, cfg.data_dir)
    print(f"generating the target's continuations of {len(specs)} prompts ...", file=sys.stderr, flush=True)
    corpus = corpus_cached(cfg.data_dir, target, tok, specs, args.max_tokens)
    drafter = make_drafter(target, cfg.drafter, always_keep=tuple(stop_token_ids(target, tok)))
    report = distill(drafter, target, corpus, args.minutes, lr=args.lr,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    manifest = save_checkpoint(drafter, args.out, version=args.version, parent="base",
                               extra={"training": {"method": "offline forward-KL on target-generated text",
                                                   **report}})
    print(json.dumps({"out": str(args.out), "version": manifest["version"], **report}))
    return 0


def cmd_drafter_pretrain(args) -> int:
    from onspec.actors.models import load_target, stop_token_ids
    from onspec.actors.feature_drafter import derive_feature_drafter
    from onspec.actors.pretrain import PretrainPlan, pretrain

    cfg = _config(args)
    for flag in ("minutes", "tokens", "local_tokens"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.tokens == 0 and args.local_tokens == 0:
        raise CLIError("nothing to train on: --tokens and --local-tokens are both 0")
    target, tok = load_target(cfg.model, cfg.data_dir)
    # Always from the derived drafter (the target's first layer, features off): pretraining is what makes the
    # shipped base, so it must not start from it.
    drafter = derive_feature_drafter(target, cfg.drafter.feature_layers, cfg.drafter.vocab_keep,
                                     always_keep=tuple(sorted(stop_token_ids(target, tok))))
    plan = PretrainPlan(out=args.out, minutes=args.minutes, tokens=args.tokens, local_tokens=args.local_tokens,
                        gen_batch=args.gen_batch, batch=args.batch, lr=args.lr, seed=args.seed)
    manifest = pretrain(plan, target, tok, drafter, version=args.version)
    p = manifest["pretraining"]
    print(json.dumps({"out": str(args.out), "version": manifest["version"], "steps": p["steps"],
                      "corpus": p["corpus"], "held_out_top1": p["held_out_top1"]}))
    return 0


def cmd_drafter_count_tokens(args) -> int:
    from onspec.actors.models import load_target
    from onspec.actors.offline_distill import corpus_cached, count_generated_tokens
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    cfg = _config(args)
    specs = read_prompts(args.prompts_file or packaged_prompts("distill_prompts.jsonl"))
    target, tok = load_target(cfg.model, cfg.data_dir)
    corpus = corpus_cached(cfg.data_dir, target, tok, specs, args.max_tokens)
    counts = count_generated_tokens(corpus, target.config.vocab_size)
    nz = {int(i): int(counts[i]) for i in counts.nonzero().flatten().tolist()}
    Path(args.out).write_text(json.dumps({"source": "target continuations of the distill prompt set",
                                          "tokens": int(counts.sum()), "counts": nz}))
    print(f"{len(nz)} distinct tokens out of {int(counts.sum())} written to {args.out}")
    return 0


# ---- drafter registry: a running server's admin endpoints ------------------------------------------------------
ADMIN_TIMEOUT_S = 10.0
ACCEPTANCE_KEYS = ("gate", "acceptance_rate", "acceptance")  # what an evaluation may call it


def _admin(args, method: str, path: str = "", body: dict | None = None) -> dict:
    """One request to the server's /v1/admin/drafters endpoints; any failure is a CLIError with the server's
    own message."""
    import httpx

    from onspec.cluster.config import read_key_file

    url = f"{args.url.rstrip('/')}/v1/admin/drafters{path}"
    key_file = getattr(args, "admin_key_file", None)
    headers = {"Authorization": f"Bearer {read_key_file(key_file)[0]}"} if key_file else {}
    try:
        resp = httpx.request(method, url, json=body, headers=headers, timeout=ADMIN_TIMEOUT_S)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise CLIError(f"cannot reach the onspec server at {args.url}: {e}") from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code >= 400:
        err = data.get("error") if isinstance(data, dict) else None
        message = err.get("message") if isinstance(err, dict) else resp.text.strip()[:200] or resp.reason_phrase
        if resp.status_code == 401:
            why = f"the server refused the key in {key_file}" if key_file else \
                "the server needs an admin key: pass --admin-key-file F"
            raise CLIError(f"{why}: {message} (HTTP 401 from {url})")
        if resp.status_code == 403:
            raise CLIError(f"the key in {key_file} is not an admin key: {message} (HTTP 403 from {url})")
        raise CLIError(f"{message} (HTTP {resp.status_code} from {url})")
    if not isinstance(data, dict):
        raise CLIError(f"{url} did not answer with JSON: is {args.url} an onspec server?")
    return data


def _version_path(version: str) -> str:
    from urllib.parse import quote

    from onspec.cluster.api import VERSION_PATTERN

    # Checked here too: a '/' in the name would reach another endpoint, not a clear 400.
    if not re.fullmatch(VERSION_PATTERN, version):
        raise CLIError(f"invalid drafter version {version!r}: expected {VERSION_PATTERN}")
    return f"/{quote(version)}"


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _acceptance(evaluation: dict) -> str:
    # The trainer's gate records {"candidate": {"gate": ...}, "serving": {...}}; others may be flat.
    figures = evaluation.get("candidate") if isinstance(evaluation.get("candidate"), dict) else evaluation
    for key in ACCEPTANCE_KEYS:
        if isinstance(figures.get(key), (int, float)):
            return f"{figures[key]:.3f}"
    return "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_drafter_list(args) -> int:
    data = _admin(args, "GET")
    if args.json:
        print(json.dumps(data))
        return 0
    rows = [["", "VERSION", "STATUS", "PARENT", "ACCEPTANCE", "CREATED"]]
    for d in data["drafters"]:
        rows.append(["*" if d["version"] == data["serving"] else "", d["version"], d["status"],
                     d.get("parent_version") or "-", _acceptance(d.get("evaluation") or {}),
                     _when(d.get("created"))])
    print(_table(rows) if data["drafters"] else "no drafter versions registered")
    return 0


def cmd_drafter_show(args) -> int:
    d = _admin(args, "GET", _version_path(args.version))
    if args.json:
        print(json.dumps(d))
        return 0
    status = f"{d['status']} ({d['reason']})" if d.get("reason") else d["status"]
    rows = [["version", d["version"]], ["status", status], ["parent", d.get("parent_version") or "-"],
            ["created", _when(d.get("created"))], ["updated", _when(d.get("updated"))],
            ["sha256", d["sha256"]], ["path", d["path"]],
            ["evaluation", json.dumps(d.get("evaluation") or {})]]
    print(_table(rows))
    return 0


def _switched(res: dict) -> str:
    if not res.get("changed"):
        return f"{res['version']} is already serving; nothing changed"
    return f"{res['version']} is now serving (was {res.get('previous') or 'none'}): {res.get('reason')}"


def cmd_drafter_promote(args) -> int:
    body = {"reason": args.reason} if args.reason else {}
    res = _admin(args, "POST", f"{_version_path(args.version)}/promote", body)
    print(json.dumps(res) if args.json else _switched(res))
    return 0


def cmd_drafter_rollback(args) -> int:
    if args.version:
        _version_path(args.version)
    body = {k: v for k, v in (("version", args.version), ("reason", args.reason)) if v}
    res = _admin(args, "POST", "/rollback", body)
    print(json.dumps(res) if args.json else _switched(res))
    return 0


def _serve_config(args) -> OnspecConfig:
    cfg = _config(args)
    # The one place the environment is read: REDIS_URL, as a default for --redis-url.
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or None
    return cfg.merged(**{
        "server.host": args.host, "server.port": args.port, "server.replicas": args.replicas,
        "server.ray_address": args.ray_address, "redis.url": redis_url,
        "server.api_key_file": getattr(args, "api_key_file", None),
        "server.admin_key_file": getattr(args, "admin_key_file", None),
        "stream.enabled": False if args.no_stream else None,
        "trainer.enabled": False if getattr(args, "no_train", False) else None,
    })


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def bind_message(cfg: OnspecConfig) -> str:
    """What `onspec serve` says about who may call it. Without any key, the API has no authentication, so it
    listens on the loopback address only: asked for another address (--host, server.host), it refuses rather
    than serve somewhere other than asked. Reads the key files (a missing or empty one is an error)."""
    api, admin = cfg.server.keys()
    host = cfg.server.host
    if api or admin:
        return (f"onspec: authentication on: {len(api)} API key(s), {len(admin)} admin key(s); /healthz, /readyz, "
                "/metrics and the dashboard page are open")
    if not _is_loopback(host):
        raise CLIError(f"no API keys are configured, so the API would have no authentication: onspec serve then "
                       f"binds to localhost only, and will not listen on {host}. Give --api-key-file F (and "
                       "--admin-key-file F; docs/security.md), or leave --host at 127.0.0.1")
    return (f"onspec: no API keys configured: listening on {host} (localhost) only, without authentication; "
            "--api-key-file F to serve other machines (docs/security.md)")


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # the same clean shutdown as Ctrl-C


def cmd_serve(args) -> int:
    from onspec.cluster.serve import Cluster, shown_url

    cfg = _serve_config(args)
    access = bind_message(cfg)
    # Ctrl-C must stop the server even when a script started it in the background (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    cluster = None
    try:
        print(access, file=sys.stderr, flush=True)
        print("onspec: starting (Ray, Redis, the engine replicas) ...", file=sys.stderr, flush=True)
        cluster = Cluster(cfg).start()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # again: ray.init installs its own handlers
        signal.signal(signal.SIGTERM, _on_sigterm)
        redis_at = shown_url(cluster.cfg.redis.url) if cluster.cfg.stream.enabled else "off"
        print(f"onspec: serving {cfg.server.served_model_name or cfg.model.name} at {cluster.url}/v1 "
              f"({cfg.server.replicas} replica(s), rejection stream: {redis_at}); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("onspec: shutting down ...", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cluster is not None:
            cluster.stop()
    return 0


def cmd_bench_serve(args) -> int:
    from onspec.cluster.bench_serve import bench_serve, format_report
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    cfg = _serve_config(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    import httpx

    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--concurrency takes a number or a comma-separated list, got {args.concurrency!r}") \
            from None
    if not levels or min(levels + [args.requests, args.max_tokens, args.pairs]) < 1:
        raise CLIError("--concurrency, --requests, --max-tokens and --pairs must be at least 1")
    if len(levels) > 1:
        if args.url:
            raise CLIError("--concurrency with several levels needs a self-started server (omit --url): it "
                           "switches speculation off for the target-only side")
        from onspec.cluster.bench_serve import bench_levels, format_levels

        with contextlib.redirect_stdout(sys.stderr):
            result = bench_levels(cfg, specs, levels, requests=args.requests, max_tokens=args.max_tokens,
                                  plots=args.plots, log=log)
        print(json.dumps(result) if args.json else format_levels(result))
        return 0
    args.concurrency = levels[0]
    try:
        # Ray prints its own shutdown chatter to stdout; keep stdout for the report (--json stays parseable).
        with contextlib.redirect_stdout(sys.stderr):
            result = bench_serve(cfg, specs, url=args.url, concurrency=args.concurrency, requests=args.requests,
                                 max_tokens=args.max_tokens, pairs=args.pairs, log=log)
    except httpx.HTTPError as e:
        raise CLIError(f"cannot reach the server: {e}") from None
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_bench_online(args) -> int:
    from onspec.cluster.bench_online import bench_online, format_report

    from onspec.cluster.prompts import read_prompts

    for path in args.phase:
        read_prompts(path)  # a bad phase file fails here, before anything starts
    if args.minutes_per_phase <= 0 or min(args.eval_prompts, args.max_tokens, args.clients) < 1:
        raise CLIError("--minutes-per-phase must be > 0; --eval-prompts, --max-tokens, --clients at least 1")
    cfg = _serve_config(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            report = bench_online(cfg, args.phase, args.minutes_per_phase, args.eval_prompts, args.max_tokens,
                                  args.clients, args.think_s, args.accept_k, p99_requests=args.p99_requests,
                                  log=log)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def cmd_bench_sources(args) -> int:
    from onspec.cluster.bench_sources import bench_sources
    from onspec.cluster.prompts import read_prompts

    read_prompts(args.phase)
    if min(args.steps, args.eval_prompts, args.max_tokens, args.traffic_prompts) < 1:
        raise CLIError("--steps, --eval-prompts, --max-tokens and --traffic-prompts must be at least 1")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; --json must stay parseable
            report = bench_sources(_config(args), args.phase, args.steps, args.eval_prompts, args.max_tokens,
                                   args.traffic_prompts, log=log)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(report))
    else:
        for name, r in report["results"].items():
            print(f"{name:18s} greedy {r['greedy']:.4f}  sampled {r['sampled']:.4f}")
    return 0


def cmd_bench_chaos(args) -> int:
    from onspec.cluster.bench_chaos import bench_chaos, format_report
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    if min(args.requests_per_scenario, args.replicas, args.clients, args.max_tokens) < 1 or args.timeout_s <= 0:
        raise CLIError("--requests-per-scenario, --replicas, --clients, --max-tokens must be at least 1; "
                       "--timeout-s above 0")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed and Ray print to stdout; --json must parse
            report = bench_chaos(_config(args), specs, args.scenario, args.requests_per_scenario, args.replicas,
                                 args.clients, args.max_tokens, args.timeout_s, args.redis_down_s, args.port,
                                 log=log)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_bench_soak(args) -> int:
    from onspec.cluster.bench_soak import bench_soak, format_report
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    if args.minutes <= 0 or args.sample_s <= 0 or min(args.concurrency, args.replicas, args.max_tokens) < 1:
        raise CLIError("--minutes and --sample-s must be > 0; --concurrency, --replicas, --max-tokens at least 1")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    with contextlib.redirect_stdout(sys.stderr):
        report = bench_soak(_config(args), specs, args.minutes, args.concurrency, args.sample_s, args.max_tokens,
                            args.replicas, port=args.port, log=log)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["hung"] == 0 and report.get("records_lost", 0) == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onspec", description="online speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", type=Path, help="YAML config file (the OnspecConfig fields)")
        sp.add_argument("--data-dir", type=Path, help="converted models, corpora, checkpoints")
        sp.add_argument("--drafter-checkpoint", type=Path, help="drafter checkpoint directory (default: derived)")
        sp.add_argument("--drafter-kind", choices=["truncated", "feature"],
                        help="the derived drafter: the target's first layers (truncated) or one layer over the "
                             "target's hidden state (feature, EAGLE; the default)")
        sp.add_argument("--drafter", action="append", choices=["model", "suffix", "hybrid"],
                        help="draft source: the drafter model, text seen before (SuffixDecoding), or per round "
                             "whichever pays (default hybrid); bench decode runs each one given side by side")
        sp.add_argument("--mode", choices=["adaedl", "fixed"], help="draft-length control")
        sp.add_argument("--max-draft", type=int, help="longest draft per round (adaedl)")
        sp.add_argument("--fixed-k", type=int, help="draft length in fixed mode")

    g = sub.add_parser("generate", help="generate for every prompt of a JSONL file")
    common(g)
    g.add_argument("--prompts-file", type=Path, required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--no-speculate", action="store_true", help="the target alone, through the same code path")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bd = b.add_parser("decode", help="target-only vs speculative tokens/s on the same prompts")
    common(bd)
    bd.add_argument("--prompts-file", type=Path)
    bd.add_argument("--max-tokens", type=int, default=128)
    bd.add_argument("--repeats", type=int, default=1)
    bd.add_argument("--compare-drafter", action="append", metavar="KIND|derived-KIND|CHECKPOINT",
                    help="also run this drafter side by side (repeatable): a kind's base drafter (truncated or "
                         "feature; the shipped pretrained one where it fits), derived-KIND for that kind derived "
                         "from the target untrained, or a drafter checkpoint directory, e.g. two kinds' versions "
                         "after the same minutes of `bench online`")
    bd.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                    help="also run transformers' generate with prompt-lookup decoding (N tokens) and without, "
                         "on the same prompts")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(func=cmd_bench_decode)

    bq = b.add_parser("quality", help="each target precision against fp32: perplexity on held-out text, argmax and "
                                      "greedy agreement, forward cost")
    common(bq)
    bq.add_argument("--precision", action="append", choices=["float32", "bfloat16", "float16"],
                    help="repeat for several (default float32 and bfloat16); fp32 is always the reference")
    bq.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    bq.add_argument("--window", type=int, default=256)
    bq.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per packaged prompt")
    bq.add_argument("--prompts-file", type=Path)
    bq.add_argument("--json", action="store_true")
    bq.set_defaults(func=cmd_bench_quality)
    bf = b.add_parser("forward", help="target forward time over 1..9 tokens, nn.Linear vs SkinnyLinear")
    common(bf)
    bf.add_argument("--reps", type=int, default=5)
    bf.set_defaults(func=cmd_bench_forward)

    def server_flags(sp):
        sp.add_argument("--host", help="bind address (default 127.0.0.1)")
        sp.add_argument("--port", type=int, help="HTTP port (default 8000)")
        sp.add_argument("--replicas", type=int, help="engine replicas (default 1)")
        sp.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
        sp.add_argument("--redis-url", help="Redis for the rejection stream (default: $REDIS_URL, else a "
                                            "private redis-server in the data dir)")
        sp.add_argument("--no-stream", action="store_true", help="do not log rejections")

    bs = b.add_parser("serve", help="load test the HTTP server; logging overhead with the stream on and off")
    common(bs)
    server_flags(bs)
    bs.add_argument("--url", help="a running server (default: start one here)")
    bs.add_argument("--concurrency", default="2", help="concurrent requests; a list (1,2,4,8) measures each "
                                                        "level, speculative vs target-only")
    bs.add_argument("--plots", help="with several levels: write tokens/s and p99 plots (PNG) to this folder")
    bs.add_argument("--requests", type=int, default=8, help="requests per phase")
    bs.add_argument("--max-tokens", type=int, default=32)
    bs.add_argument("--pairs", type=int, default=2, help="stream on/off phase pairs (self-started server)")
    bs.add_argument("--prompts-file", type=Path)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_bench_serve)

    bo = b.add_parser("online", help="the online loop end to end: live traffic per phase, training, hot swaps; "
                                     "acceptance and speedup at each phase's start and end")
    common(bo)
    server_flags(bo)
    bo.add_argument("--phase", type=Path, action="append", required=True,
                    help="a JSONL prompt file (as for generate); repeat for a sequence of domains")
    bo.add_argument("--minutes-per-phase", type=float, default=10.0)
    bo.add_argument("--eval-prompts", type=int, default=3, help="the first N prompts of a phase are its fixed "
                                                                "measurement slice, never sent as traffic")
    bo.add_argument("--max-tokens", type=int, default=64)
    bo.add_argument("--clients", type=int, default=1, help="closed-loop traffic clients")
    bo.add_argument("--think-s", type=float, default=1.0, help="mean pause between a client's requests")
    bo.add_argument("--accept-k", type=int, default=4, help="fixed draft length of the acceptance measurement")
    bo.add_argument("--p99-requests", type=int, default=8, help="requests per run of the serving-latency check "
                                                                "with the trainer paused vs running (0: skip)")
    bo.add_argument("--json", action="store_true")
    bo.set_defaults(func=cmd_bench_online)

    bsrc = b.add_parser("sources", help="what each trainer data source adds: rejected positions only, whole "
                                        "windows, windows + on-policy, same traffic and steps")
    common(bsrc)
    bsrc.add_argument("--phase", type=Path, required=True, help="a JSONL prompt file")
    bsrc.add_argument("--steps", type=int, default=60)
    bsrc.add_argument("--eval-prompts", type=int, default=4)
    bsrc.add_argument("--traffic-prompts", type=int, default=16)
    bsrc.add_argument("--max-tokens", type=int, default=64)
    bsrc.add_argument("--json", action="store_true")
    bsrc.set_defaults(func=cmd_bench_sources)

    from onspec.cluster.bench_chaos import SCENARIOS

    bc = b.add_parser("chaos", help="faults on the real processes under load: kill a replica, the trainer (mid-"
                                    "step), redis-server; a tampered checkpoint (docs/reliability.md)")
    common(bc)
    bc.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeat to pick several (default all)")
    bc.add_argument("--requests-per-scenario", type=int, default=16)
    bc.add_argument("--replicas", type=int, default=2, help="engine replicas of the cluster it starts")
    bc.add_argument("--clients", type=int, default=3, help="closed-loop HTTP clients")
    bc.add_argument("--max-tokens", type=int, default=16)
    bc.add_argument("--timeout-s", type=float, default=120.0, help="a request not answered by then counts as hung")
    bc.add_argument("--redis-down-s", type=float, default=10.0, help="how long redis-server stays down")
    bc.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    bc.add_argument("--prompts-file", type=Path)
    bc.add_argument("--json", action="store_true")
    bc.set_defaults(func=cmd_bench_chaos)

    bk = b.add_parser("soak", help="steady load for a long time with the trainer on: memory of every process, "
                                   "error rate, acceptance over time")
    common(bk)
    bk.add_argument("--minutes", type=float, default=30.0)
    bk.add_argument("--concurrency", type=int, default=2, help="closed-loop HTTP clients")
    bk.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    bk.add_argument("--max-tokens", type=int, default=64)
    bk.add_argument("--replicas", type=int, default=1)
    bk.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    bk.add_argument("--prompts-file", type=Path)
    bk.add_argument("--json", action="store_true")
    bk.set_defaults(func=cmd_bench_soak)

    sv = sub.add_parser("serve", help="the OpenAI-compatible endpoint on Ray Serve")
    common(sv)
    server_flags(sv)
    sv.add_argument("--no-train", action="store_true", help="serve without the online trainer")
    sv.add_argument("--api-key-file", type=Path, help="API keys, one a line (# comments); without any key the "
                                                      "server has no authentication and binds to localhost only")
    sv.add_argument("--admin-key-file", type=Path, help="admin keys (drafter promotion, rollback), one a line")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("drafter", help="drafter checkpoints").add_subparsers(dest="drafter_cmd", required=True)
    dd = d.add_parser("distill", help="distil a drafter offline on text the target generates")
    common(dd)
    dd.add_argument("--out", type=Path, required=True)
    dd.add_argument("--prompts-file", type=Path)
    dd.add_argument("--max-tokens", type=int, default=160)
    dd.add_argument("--minutes", type=float, default=4.0)
    dd.add_argument("--lr", type=float, default=3e-4)
    dd.add_argument("--layers", type=int)
    dd.add_argument("--vocab-keep", type=int)
    dd.add_argument("--version", default="offline-1")
    dd.set_defaults(func=cmd_drafter_distill)
    dp = d.add_parser("pretrain", help="pretrain the base feature drafter: dense distillation from the target on "
                                       "local text and its own answers to a broad prompt set (resumable)")
    common(dp)
    dp.add_argument("--out", type=Path, required=True, help="checkpoint folder; an interrupted run resumes here")
    dp.add_argument("--minutes", type=float, default=20.0, help="training minutes (after the data is made)")
    dp.add_argument("--tokens", type=int, default=200_000, help="tokens of target-written answers to make")
    dp.add_argument("--local-tokens", type=int, default=100_000, help="tokens of local text (Python sources)")
    dp.add_argument("--gen-batch", type=int, default=48, help="prompts answered per batched generate")
    dp.add_argument("--batch", type=int, default=8, help="windows per optimizer step")
    dp.add_argument("--lr", type=float, default=5e-4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--version", default="base-feature-pretrained")
    dp.set_defaults(func=cmd_drafter_pretrain)
    dc = d.add_parser("count-tokens", help="count the target's generated tokens (VocabTrim's frequencies)")
    common(dc)
    dc.add_argument("--out", type=Path, required=True)
    dc.add_argument("--prompts-file", type=Path)
    dc.add_argument("--max-tokens", type=int, default=160)
    dc.set_defaults(func=cmd_drafter_count_tokens)
    admin_commands(d)
    return p


def admin_commands(d) -> None:
    """`onspec drafter list|show|promote|rollback`: the registry through a running server's admin endpoints."""
    def admin(name: str, text: str, func):
        sp = d.add_parser(name, help=text)
        sp.add_argument("--url", default="http://127.0.0.1:8000", help="the onspec server")
        sp.add_argument("--json", action="store_true", help="print the server's JSON answer")
        sp.add_argument("--admin-key-file", type=Path, help="a file whose first key is sent as the bearer token")
        sp.set_defaults(func=func)
        return sp

    admin("list", "the registered drafter versions (* marks the serving one)", cmd_drafter_list)
    admin("show", "one drafter version", cmd_drafter_show).add_argument("version")
    pr = admin("promote", "serve this version on every replica", cmd_drafter_promote)
    pr.add_argument("version")
    pr.add_argument("--reason", help="recorded in the history")
    rb = admin("rollback", "serve the version before the current one again (or the one given)",
               cmd_drafter_rollback)
    rb.add_argument("version", nargs="?")
    rb.add_argument("--reason", help="recorded in the history")


# Errors whose message is the whole story for the user: "onspec: error: ...", exit 2, no traceback.
USER_ERRORS = (("onspec.cluster.prompts", "PromptFileError"), ("onspec.actors.engine", "RequestError"),
               ("onspec.actors.checkpoint", "CheckpointError"), ("onspec.actors.models", "ModelLoadError"),
               ("onspec.actors.registry", "RegistryError"), ("onspec.cluster.redis_server", "RedisServerError"),
               ("onspec.cluster.serve", "ServeError"), ("onspec.cluster.config", "SecretFileError"))


def _user_error(e: Exception) -> bool:
    # Looked up among the modules already imported, not imported here: an error from a module the command
    # never loaded cannot occur, and the light commands (drafter list ...) must not pay torch's import.
    return isinstance(e, CLIError) or any(
        isinstance(e, getattr(sys.modules[mod], name)) for mod, name in USER_ERRORS if mod in sys.modules)


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        print(f"onspec: error: invalid configuration: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"onspec: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"onspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
