"""`onspec bench ...`: each benchmark's command (flags, checks that name the bad flag, report printing) over the
bench modules beside it."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from onspec.actors.config import OnspecConfig
from onspec.cluster.bench.peers import PEERS
from onspec.cluster.cli_args import (CLIError, common_flags, config_from_args, engine_from_config, serve_config,
                                     server_flags)


def cmd_bench_quality(args) -> int:
    from onspec.cluster.bench.quality import bench_quality, format_report
    from onspec.actors.prompts import packaged_prompts, read_prompts

    if args.tokens < args.window or args.window < 2 or args.max_tokens < 1:
        raise CLIError("--tokens must be at least --window, --window at least 2, --max-tokens at least 1")
    specs, cfg = read_prompts(args.prompts_file or packaged_prompts()), config_from_args(args)
    log = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    result = bench_quality(cfg, specs, args.precision or ["float32", "bfloat16"], tokens=args.tokens,
                           window=args.window, max_tokens=args.max_tokens, log=log)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def cmd_bench_decode(args) -> int:
    from onspec.cluster.bench.decode import bench_decode
    from onspec.actors.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    response_format = _response_format(args.response_format)  # a bad one fails before the model loads
    cfg = config_from_args(args)
    peers = _peers(args.peer or [], cfg)  # a missing peer fails before the model loads
    engine = engine_from_config(cfg)
    log = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True)) if not args.json else (lambda *_: None)
    sources = tuple(dict.fromkeys(args.drafter or [engine.spec.source]))
    drafters = _compare_drafters(args.compare_drafter or [], engine, cfg)
    result = bench_decode(engine, specs, args.max_tokens, repeats=args.repeats, sources=sources,
                          prompt_lookup=args.prompt_lookup, log=log, drafters=drafters,
                          response_format=response_format, peers=peers)
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
        for name, figures in result.get("peers", {}).items():
            print(f"{'peer ' + name:28s} {json.dumps(figures)}")
    return 0


def _peers(names: list[str], cfg: OnspecConfig) -> dict:
    """``--peer``: each named peer on the GGUF file the target was loaded from, with as many threads as torch."""
    import torch

    from onspec.actors.models import default_gguf_path
    from onspec.cluster.bench.peers import PeerMissing, make_peer

    gguf = cfg.model.gguf_path or default_gguf_path()
    try:
        return {name: make_peer(name, gguf, torch.get_num_threads(), cfg.model.max_context + 64)
                for name in dict.fromkeys(names)}
    except PeerMissing as e:
        raise CLIError(str(e)) from None


def _response_format(value: str | None) -> dict | None:
    """``--response-format``: json_object, or a JSON Schema file (json_schema, strict)."""
    if value is None:
        return None
    if value == "json_object":
        return {"type": "json_object"}
    try:
        schema = json.loads(Path(value).read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"--response-format {value}: not json_object, nor a readable JSON Schema file ({e})") \
            from None
    return {"type": "json_schema", "json_schema": {"name": Path(value).stem, "schema": schema, "strict": True}}


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
    from onspec.cluster.bench.decode import bench_forward

    cfg = config_from_args(args)
    target, _ = load_target(cfg.model, cfg.data_dir)
    print(json.dumps(bench_forward(target, reps=args.reps)))
    return 0



def cmd_bench_serve(args) -> int:
    from onspec.cluster.bench.serve import bench_serve, format_report
    from onspec.actors.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    cfg = serve_config(args)
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
        from onspec.cluster.bench.serve import bench_levels, format_levels

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
    from onspec.cluster.bench.online import bench_online, format_report

    from onspec.actors.prompts import read_prompts

    for path in args.phase:
        read_prompts(path)  # a bad phase file fails here, before anything starts
    if args.minutes_per_phase <= 0 or min(args.eval_prompts, args.max_tokens, args.clients) < 1:
        raise CLIError("--minutes-per-phase must be > 0; --eval-prompts, --max-tokens, --clients at least 1")
    cfg = serve_config(args)
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
    from onspec.cluster.bench.sources import bench_sources
    from onspec.actors.prompts import read_prompts

    read_prompts(args.phase)
    cfg = config_from_args(args)
    if min(args.steps, args.eval_prompts, args.max_tokens, args.traffic_prompts) < 1:
        raise CLIError("--steps, --eval-prompts, --max-tokens and --traffic-prompts must be at least 1")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; --json must stay parseable
            report = bench_sources(cfg, args.phase, args.steps, args.eval_prompts, args.max_tokens,
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
    from onspec.cluster.bench.chaos import bench_chaos, format_report
    from onspec.actors.prompts import packaged_prompts, read_prompts

    specs, cfg = read_prompts(args.prompts_file or packaged_prompts()), config_from_args(args)
    if min(args.requests_per_scenario, args.replicas, args.clients, args.max_tokens) < 1 or args.timeout_s <= 0:
        raise CLIError("--requests-per-scenario, --replicas, --clients, --max-tokens must be at least 1; "
                       "--timeout-s above 0")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed and Ray print to stdout; --json must parse
            report = bench_chaos(cfg, specs, args.scenario, args.requests_per_scenario, args.replicas,
                                 args.clients, args.max_tokens, args.timeout_s, args.redis_down_s, args.port,
                                 log=log)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_bench_soak(args) -> int:
    from onspec.cluster.bench.soak import bench_soak, format_report
    from onspec.actors.prompts import packaged_prompts, read_prompts

    specs, cfg = read_prompts(args.prompts_file or packaged_prompts()), config_from_args(args)
    if args.minutes <= 0 or args.sample_s <= 0 or min(args.concurrency, args.replicas, args.max_tokens) < 1:
        raise CLIError("--minutes and --sample-s must be > 0; --concurrency, --replicas, --max-tokens at least 1")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    with contextlib.redirect_stdout(sys.stderr):
        report = bench_soak(cfg, specs, args.minutes, args.concurrency, args.sample_s, args.max_tokens,
                            args.replicas, port=args.port, log=log)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["hung"] == 0 and report.get("records_lost", 0) == 0 else 1


def add_bench_parsers(sub) -> None:
    """The `bench` command's subcommands, under the top-level parser's subparsers ``sub``."""
    from onspec.cluster.bench.chaos import SCENARIOS

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)

    def bench(name: str, func, server: bool = False, json: bool = True, **kw):
        sp = b.add_parser(name, **kw)
        common_flags(sp)
        if server:
            server_flags(sp)
        if json:
            sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
        return sp

    bd = bench("decode", cmd_bench_decode,
               help="target-only vs speculative tokens/s on the same prompts")
    bd.add_argument("--prompts-file", type=Path)
    bd.add_argument("--max-tokens", type=int, default=128)
    bd.add_argument("--repeats", type=int, default=1)
    bd.add_argument("--compare-drafter", action="append", metavar="KIND|derived-KIND|CHECKPOINT",
                    help="also run this drafter side by side (repeatable): a kind's base drafter (truncated or "
                         "feature; the shipped pretrained one where it fits), derived-KIND for that kind derived "
                         "from the target untrained, or a drafter checkpoint directory, e.g. two kinds' versions "
                         "after the same minutes of `bench online`")
    bd.add_argument("--response-format", metavar="json_object|SCHEMA.json",
                    help="decode every mode under this structured output (a grammar masks the target); the report "
                         "adds the mask's cost per token")
    bd.add_argument("--peer", action="append", choices=PEERS,
                    help="also decode every prompt with this peer on the same GGUF file, plainly and with its "
                         "prompt-lookup drafting (llamacpp: the optional extra onspec[peers])")
    bd.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                    help="also run transformers' generate with prompt-lookup decoding (N tokens) and without, "
                         "on the same prompts")

    bq = bench("quality", cmd_bench_quality,
               help="each target precision against fp32: perplexity on held-out text, argmax and greedy agreement, "
                    "forward cost")
    bq.add_argument("--precision", action="append", choices=["float32", "bfloat16", "float16", "int4"],
                    help="repeat for several (default float32 and bfloat16); fp32 is always the reference")
    bq.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    bq.add_argument("--window", type=int, default=256)
    bq.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per packaged prompt")
    bq.add_argument("--prompts-file", type=Path)
    bf = bench("forward", cmd_bench_forward, json=False,
               help="target forward time over 1..9 tokens, nn.Linear vs SkinnyLinear")
    bf.add_argument("--reps", type=int, default=5)

    bs = bench("serve", cmd_bench_serve, server=True,
               help="load test the HTTP server; logging overhead with the stream on and off")
    bs.add_argument("--url", help="a running server (default: start one here)")
    bs.add_argument("--concurrency", default="2", help="concurrent requests; a list (1,2,4,8) measures each "
                                                        "level, speculative vs target-only")
    bs.add_argument("--plots", help="with several levels: write tokens/s and p99 plots (PNG) to this folder")
    bs.add_argument("--requests", type=int, default=8, help="requests per phase")
    bs.add_argument("--max-tokens", type=int, default=32)
    bs.add_argument("--pairs", type=int, default=2, help="stream on/off phase pairs (self-started server)")
    bs.add_argument("--prompts-file", type=Path)

    bo = bench("online", cmd_bench_online, server=True,
               help="the online loop end to end: live traffic per phase, training, hot swaps; acceptance and speedup "
                    "at each phase's start and end")
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

    bsrc = bench("sources", cmd_bench_sources,
               help="what each trainer data source adds: rejected positions only, whole windows, windows + "
                    "on-policy, same traffic and steps")
    bsrc.add_argument("--phase", type=Path, required=True, help="a JSONL prompt file")
    bsrc.add_argument("--steps", type=int, default=60)
    bsrc.add_argument("--eval-prompts", type=int, default=4)
    bsrc.add_argument("--traffic-prompts", type=int, default=16)
    bsrc.add_argument("--max-tokens", type=int, default=64)

    bc = bench("chaos", cmd_bench_chaos,
               help="faults on the real processes under load: kill a replica, the trainer (mid-step), redis-server; "
                    "a tampered checkpoint (docs/reliability.md)")
    bc.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeat to pick several (default all)")
    bc.add_argument("--requests-per-scenario", type=int, default=16)
    bc.add_argument("--replicas", type=int, default=2, help="engine replicas of the cluster it starts")
    bc.add_argument("--clients", type=int, default=3, help="closed-loop HTTP clients")
    bc.add_argument("--max-tokens", type=int, default=16)
    bc.add_argument("--timeout-s", type=float, default=120.0, help="a request not answered by then counts as hung")
    bc.add_argument("--redis-down-s", type=float, default=10.0, help="how long redis-server stays down")
    bc.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    bc.add_argument("--prompts-file", type=Path)

    bk = bench("soak", cmd_bench_soak,
               help="steady load for a long time with the trainer on: memory of every process, error rate, "
                    "acceptance over time")
    bk.add_argument("--minutes", type=float, default=30.0)
    bk.add_argument("--concurrency", type=int, default=2, help="closed-loop HTTP clients")
    bk.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    bk.add_argument("--max-tokens", type=int, default=64)
    bk.add_argument("--replicas", type=int, default=1)
    bk.add_argument("--port", type=int, help="HTTP port (default: a free one)")
    bk.add_argument("--prompts-file", type=Path)
