"""The `onspec` command."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path

from onspec.actors.config import OnspecConfig
from onspec.cluster.bench.commands import add_bench_parsers
from onspec.cluster.cli_args import (CLIError, common_flags, config_from_args, engine_from_config, serve_config,
                                     server_flags)


def cmd_generate(args) -> int:
    from onspec.actors.requests import RequestError, SamplingParams
    from onspec.actors.prompts import read_prompts

    specs = read_prompts(args.prompts_file)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    params.validate()
    engine = engine_from_config(config_from_args(args))
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


def cmd_drafter_distill(args) -> int:
    from onspec.actors.checkpoint import save_checkpoint
    from onspec.actors.models import load_target, make_drafter, stop_token_ids
    from onspec.actors.offline_distill import corpus_cached, distill
    from onspec.actors.prompts import packaged_prompts, read_prompts

    cfg = config_from_args(args)
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

    cfg = config_from_args(args)
    for flag in ("minutes", "tokens", "local_tokens", "written_requests", "bulk_rows"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 0")
    if not 0 <= args.docstring_share < 1:
        raise CLIError(f"--docstring-share must be in [0, 1), not {args.docstring_share}")
    if args.tokens == 0 and args.local_tokens == 0:
        raise CLIError("nothing to train on: --tokens and --local-tokens are both 0")
    target, tok = load_target(cfg.model, cfg.data_dir)
    stops = tuple(sorted(stop_token_ids(target, tok)))
    if args.init is None:
        # From the derived drafter (the target's first layer, features off) unless told to go on from a
        # checkpoint: the shipped base is made this way.
        drafter = derive_feature_drafter(target, cfg.drafter.feature_layers, cfg.drafter.vocab_keep,
                                         always_keep=stops)
    else:
        from onspec.actors.checkpoint import CheckpointError, load_checkpoint
        from onspec.actors.models import PACKAGED_BASE
        from importlib import resources

        folder = (Path(str(resources.files("onspec.actors") / "data" / PACKAGED_BASE)) if args.init == "shipped"
                  else args.init)
        try:
            drafter, _ = load_checkpoint(folder, target)
        except (CheckpointError, OSError) as e:
            raise CLIError(f"--init {args.init}: {e}") from None
        if drafter.kind != "feature":
            raise CLIError(f"--init {args.init}: a {drafter.kind} drafter; pretraining makes feature drafters")
        drafter = drafter.float()
    plan = PretrainPlan(out=args.out, minutes=args.minutes, tokens=args.tokens, local_tokens=args.local_tokens,
                        gen_batch=args.gen_batch, batch=args.batch, lr=args.lr, seed=args.seed,
                        vocab_from_corpus=not args.keep_vocabulary, written_requests=args.written_requests,
                        docstring_share=args.docstring_share, bulk_rows=args.bulk_rows)
    manifest = pretrain(plan, target, tok, drafter, version=args.version, always_keep=stops,
                        init=None if args.init is None else str(args.init))
    p = manifest["pretraining"]
    print(json.dumps({"out": str(args.out), "version": manifest["version"], "steps": p["steps"],
                      "corpus": p["corpus"], "held_out_top1": p["held_out_top1"]}))
    return 0


def cmd_drafter_count_tokens(args) -> int:
    from onspec.actors.models import load_target
    from onspec.actors.offline_distill import corpus_cached, count_generated_tokens
    from onspec.actors.prompts import packaged_prompts, read_prompts

    cfg = config_from_args(args)
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

    from onspec.actors.config import read_key_file

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

    from onspec.cluster.api.protocol import VERSION_PATTERN

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

    cfg = serve_config(args)
    if cfg.model.chat_template:  # a template the replicas could not read: say so now, not from inside Ray
        from onspec.actors.models import chat_template_text
        chat_template_text(cfg.model.chat_template)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onspec", description="online speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate for every prompt of a JSONL file")
    common_flags(g)
    g.add_argument("--prompts-file", type=Path, required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--no-speculate", action="store_true", help="the target alone, through the same code path")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    add_bench_parsers(sub)

    sv = sub.add_parser("serve", help="the OpenAI-compatible endpoint on Ray Serve")
    common_flags(sv)
    server_flags(sv)
    sv.add_argument("--no-train", action="store_true", help="serve without the online trainer")
    sv.add_argument("--api-key-file", type=Path, help="API keys, one a line (# comments); without any key the "
                                                      "server has no authentication and binds to localhost only")
    sv.add_argument("--admin-key-file", type=Path, help="admin keys (drafter promotion, rollback), one a line")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("drafter", help="drafter checkpoints").add_subparsers(dest="drafter_cmd", required=True)
    dd = d.add_parser("distill", help="distil a drafter offline on text the target generates")
    common_flags(dd)
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
    common_flags(dp)
    dp.add_argument("--out", type=Path, required=True, help="checkpoint folder; an interrupted run resumes here")
    dp.add_argument("--minutes", type=float, default=20.0, help="training minutes (after the data is made)")
    dp.add_argument("--tokens", type=int, default=200_000, help="tokens of target-written answers to make")
    dp.add_argument("--local-tokens", type=int, default=100_000, help="tokens of local text (Python sources)")
    dp.add_argument("--gen-batch", type=int, default=48, help="prompts answered per batched generate")
    dp.add_argument("--batch", type=int, default=8, help="windows per optimizer step")
    dp.add_argument("--lr", type=float, default=5e-4)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--version", default="base-feature-pretrained")
    dp.add_argument("--init", help="start from this checkpoint folder's weights ('shipped': the packaged base) "
                                   "instead of the derived drafter")
    dp.add_argument("--keep-vocabulary", action="store_true",
                    help="keep the starting drafter's kept vocabulary instead of re-choosing it from the answers "
                         "(a run that goes on from --init with more data then reuses the teacher shards scored "
                         "for it)")
    dp.add_argument("--written-requests", type=int, default=0,
                    help="answer this many requests the target writes itself (continuing lists of the template "
                         "prompts) instead of the templates: other phrasings than the templates'")
    dp.add_argument("--docstring-share", type=float, default=0.0,
                    help="mix this share of code tasks in the standard library's docstring words into the "
                         "template prompts (0-1)")
    dp.add_argument("--bulk-rows", type=int, default=32,
                    help="write the answers with bf16 matmuls over the dequantized 4-bit weights wherever a "
                         "matmul has this many rows (faster than the 4-bit kernel there; 0: never); the teacher "
                         "always runs at the served precision")
    dp.set_defaults(func=cmd_drafter_pretrain)
    dc = d.add_parser("count-tokens", help="count the target's generated tokens (VocabTrim's frequencies)")
    common_flags(dc)
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
USER_ERRORS = (("onspec.actors.prompts", "PromptFileError"), ("onspec.actors.engine", "RequestError"),
               ("onspec.actors.checkpoint", "CheckpointError"), ("onspec.actors.models", "ModelLoadError"),
               ("onspec.actors.registry", "RegistryError"), ("onspec.cluster.redis_server", "RedisServerError"),
               ("onspec.cluster.serve", "ServeError"), ("onspec.actors.config", "SecretFileError"))


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
