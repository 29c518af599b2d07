"""`onspec bench quality`: what a cheaper precision of the target costs in quality and gains in speed, each precision
against the fp32 reference in one run.

Quality: perplexity on held-out local text (the Python standard library and pydoc's prose topics, teacher-forced
in windows), the share of positions whose argmax equals fp32's there, and greedy decoding of the packaged prompts
compared token for token with fp32's. Speed: the engine's own calibration (a target forward over 1 row and over
8 rows of one token). A precision whose perplexity rises more than 2% over fp32 is not a candidate default.
"""
from __future__ import annotations

import math
import time

import torch

from onspec.actors.config import OnspecConfig
from onspec.actors.prompts import PromptSpec

PPL_BAR_PCT = 2.0


@torch.inference_mode()
def _score(target, windows: list[list[int]]) -> tuple[float, torch.Tensor]:
    """(mean next-token NLL over every position of every window, the argmax ids [positions])."""
    nll, count, argmax = 0.0, 0, []
    for ids in windows:
        x = torch.tensor([ids], device=target.device)
        logits = target(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
        argmax.append(logits.argmax(-1).cpu())
    return nll / count, torch.cat(argmax)


def bench_quality(cfg: OnspecConfig, specs: list[PromptSpec], precisions: list[str], tokens: int = 8192,
                  window: int = 256, max_tokens: int = 32, log=lambda *_: None) -> dict:
    from onspec.actors.engine import SpeculativeEngine
    from onspec.actors.requests import SamplingParams
    from onspec.actors.pretrain import local_windows

    rows, ref = [], None
    for dtype in ["float32"] + [p for p in precisions if p != "float32"]:
        t0 = time.perf_counter()
        engine = SpeculativeEngine.from_config(cfg.merged(**{"model.dtype": dtype}))
        if ref is None:  # the held-out text, tokenised once
            windows = [w["ids"] for w in local_windows(engine.tokenizer, tokens, window, seed=7)]
        nll, argmax = _score(engine.target, windows)
        outs = [engine.generate(engine.encode(s.prompt, s.messages), SamplingParams(max_tokens=max_tokens),
                                speculate=False).token_ids for s in specs]
        engine.calibrate(reps=3)
        row = {"dtype": dtype, "perplexity": round(math.exp(nll), 4), "positions": int(argmax.numel()),
               "forward_1_ms": round(engine.batch_costs[1][0] * 1000, 2),
               "forward_8x1_ms": round(engine.batch_costs[max(engine.batch_costs)][0] * 1000, 2),
               "rows_measured": max(engine.batch_costs), "load_and_score_s": round(time.perf_counter() - t0, 1)}
        if ref is None:
            ref = {"nll": nll, "argmax": argmax, "outs": outs}
        matched = [_common_prefix(a, b) / max(len(b), 1) for a, b in zip(outs, ref["outs"])]
        row.update({"perplexity_vs_fp32_pct": round((math.exp(nll - ref["nll"]) - 1) * 100, 3),
                    "argmax_agreement": round(float((argmax == ref["argmax"]).float().mean()), 4),
                    "greedy_identical": sum(a == b for a, b in zip(outs, ref["outs"])),
                    "greedy_prefix_matched": round(sum(matched) / len(matched), 4) if matched else 1.0,
                    "candidate_default": (math.exp(nll - ref["nll"]) - 1) * 100 <= PPL_BAR_PCT})
        log(row)
        rows.append(row)
        del engine
    return {"tokens": sum(len(w) for w in windows), "window": window, "prompts": len(specs),
            "max_tokens": max_tokens, "bar_pct": PPL_BAR_PCT, "precisions": rows}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def format_report(result: dict) -> str:
    lines = [f"{result['tokens']} held-out tokens in windows of {result['window']}; greedy on {result['prompts']} "
             f"prompts x {result['max_tokens']} tokens; bar: perplexity within {result['bar_pct']}% of fp32",
             f"{'dtype':>10s} {'ppl':>9s} {'vs fp32':>8s} {'argmax':>7s} {'greedy same':>11s} {'prefix':>7s} "
             f"{'1 row ms':>9s} {'8 rows ms':>9s}"]
    for r in result["precisions"]:
        lines.append(f"{r['dtype']:>10s} {r['perplexity']:>9.3f} {r['perplexity_vs_fp32_pct']:>+7.2f}% "
                     f"{r['argmax_agreement']:>7.3f} {r['greedy_identical']:>5d}/{result['prompts']:<5d} "
                     f"{r['greedy_prefix_matched']:>7.3f} {r['forward_1_ms']:>9.1f} {r['forward_8x1_ms']:>9.1f}")
    return "\n".join(lines)
