"""The `onspec` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onspec.cluster.config import OnspecConfig


class CLIError(Exception):
    pass


def _config(args) -> OnspecConfig:
    cfg = OnspecConfig.from_yaml(args.config) if getattr(args, "config", None) else OnspecConfig()
    return cfg.merged(**{
        "data_dir": getattr(args, "data_dir", None),
        "drafter.checkpoint": getattr(args, "drafter", None),
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


def cmd_bench_decode(args) -> int:
    from onspec.cluster.bench import bench_decode
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    specs = read_prompts(args.prompts_file or packaged_prompts())
    engine = _engine(_config(args))
    log = (lambda row: print(json.dumps(row), file=sys.stderr, flush=True)) if not args.json else (lambda *_: None)
    result = bench_decode(engine, specs, args.max_tokens, repeats=args.repeats, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k != "prompts":
                print(f"{k:28s} {v}")
    return 0


def cmd_drafter_distill(args) -> int:
    from onspec.actors.checkpoint import save_checkpoint
    from onspec.actors.models import derive_drafter, load_target, stop_token_ids
    from onspec.actors.offline_distill import corpus_cached, distill
    from onspec.cluster.prompts import packaged_prompts, read_prompts

    cfg = _config(args)
    specs = read_prompts(args.prompts_file or packaged_prompts("distill_prompts.jsonl"))
    target, tok = load_target(cfg.model, cfg.data_dir)
    print(f"generating the target's continuations of {len(specs)} prompts ...", file=sys.stderr, flush=True)
    corpus = corpus_cached(cfg.data_dir, target, tok, specs, args.max_tokens)
    drafter = derive_drafter(target, cfg.drafter.layers, cfg.drafter.vocab_keep,
                             always_keep=tuple(stop_token_ids(target, tok)))
    report = distill(drafter, target, corpus, args.minutes, lr=args.lr,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    manifest = save_checkpoint(drafter, args.out, version=args.version, parent="base",
                               extra={"training": {"method": "offline forward-KL on target-generated text",
                                                   **report}})
    print(json.dumps({"out": str(args.out), "version": manifest["version"], **report}))
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onspec", description="online speculative decoding")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", type=Path, help="YAML config file (the OnspecConfig fields)")
        sp.add_argument("--data-dir", type=Path, help="converted models, corpora, checkpoints")
        sp.add_argument("--drafter", type=Path, help="drafter checkpoint directory (default: derived)")
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
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(func=cmd_bench_decode)

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
    dc = d.add_parser("count-tokens", help="count the target's generated tokens (VocabTrim's frequencies)")
    common(dc)
    dc.add_argument("--out", type=Path, required=True)
    dc.add_argument("--prompts-file", type=Path)
    dc.add_argument("--max-tokens", type=int, default=160)
    dc.set_defaults(func=cmd_drafter_count_tokens)
    return p


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from onspec.actors.checkpoint import CheckpointError
    from onspec.actors.engine import RequestError
    from onspec.actors.models import ModelLoadError
    from onspec.cluster.prompts import PromptFileError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, PromptFileError, RequestError, CheckpointError, ModelLoadError) as e:
        print(f"onspec: error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"onspec: error: invalid configuration: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"onspec: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
