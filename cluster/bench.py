"""`onspec bench decode`: target-only and speculative decoding on the same prompts, side by side."""
from __future__ import annotations

from onspec.actors.engine import SamplingParams, SpeculativeEngine
from onspec.cluster.prompts import PromptSpec
from onspec.kernels.draft_length import best_draft_length


def bench_decode(engine: SpeculativeEngine, specs: list[PromptSpec], max_tokens: int, repeats: int = 1,
                 log=lambda *_: None) -> dict:
    """Interleaves the two modes prompt by prompt (so drift in machine load hits both alike), after one
    excluded warm-up of each. Greedy, so the speculative output must equal the target's token for token."""
    prompts = [engine.encode(s.prompt, s.messages) for s in specs]
    for ids in prompts:
        engine.check_prompt(ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    warm = SamplingParams(max_tokens=8)
    engine.generate(prompts[0], warm, speculate=False)
    engine.generate(prompts[0], warm, speculate=True)
    totals = {m: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "forwards": 0} for m in ("t", "s")}
    identical = True
    per_prompt = []
    for _ in range(repeats):
        for spec, ids in zip(specs, prompts):
            runs = {}
            for mode, speculate in (("t", False), ("s", True)):
                g = engine.generate(ids, params, speculate=speculate)
                runs[mode] = g
                tot = totals[mode]
                tot["tokens"] += g.stats.completion_tokens
                tot["seconds"] += g.stats.elapsed_s
                tot["drafted"] += g.stats.drafted
                tot["accepted"] += g.stats.accepted
                tot["forwards"] += g.stats.target_forwards
            same = runs["t"].token_ids == runs["s"].token_ids
            identical &= same
            row = {"id": spec.id, "target_tokens_per_s": round(runs["t"].stats.tokens_per_s, 3),
                   "spec_tokens_per_s": round(runs["s"].stats.tokens_per_s, 3),
                   "acceptance_rate": round(runs["s"].stats.acceptance_rate, 4), "identical": same}
            per_prompt.append(row)
            log(row)
    t, s = totals["t"], totals["s"]
    t_tps, s_tps = t["tokens"] / t["seconds"], s["tokens"] / s["seconds"]
    alpha = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
    ctl = engine.controller
    cost_ratio = ctl.draft_cost / ctl.verify_cost[0]
    k = engine.spec.max_draft if engine.spec.mode == "adaedl" else engine.spec.fixed_k
    _, predicted = best_draft_length(alpha, ctl.draft_cost, ctl.verify_cost, k)
    return {
        "target_tokens_per_s": round(t_tps, 3),
        "spec_tokens_per_s": round(s_tps, 3),
        "speedup": round(s_tps / t_tps, 4),
        "acceptance_rate": round(alpha, 4),
        "tokens_per_step": round(s["tokens"] / s["forwards"], 4),
        "identical": identical,
        "drafted": s["drafted"],
        "accepted": s["accepted"],
        "drafter_version": getattr(engine.drafter, "version", None),
        "drafter_cost_per_token_ms": round(ctl.draft_cost * 1000, 2),
        "target_forward_ms": [round(c * 1000, 1) for c in ctl.verify_cost],
        "drafter_cost_ratio": round(cost_ratio, 4),
        "predicted_speedup": round(predicted, 4),
        "prompts": per_prompt,
    }


def bench_forward(target, sizes=(1, 2, 3, 4, 5, 7, 9), reps: int = 5, context: int = 64) -> dict:
    """Target forward time over n new tokens (with a KV cache of ``context``), nn.Linear vs SkinnyLinear,
    interleaved per repetition; the median of ``reps``."""
    import statistics
    import time

    import torch
    from transformers import DynamicCache

    from onspec.actors.engine import rollback
    from onspec.actors.skinny_linear import SkinnyLinear

    skinny = [m for m in target.modules() if isinstance(m, SkinnyLinear)]
    ctx = torch.arange(1, context + 1).unsqueeze(0)
    times = {"linear": {n: [] for n in sizes}, "skinny": {n: [] for n in sizes}}
    with torch.inference_mode():
        cache = DynamicCache()
        target(input_ids=ctx, cache=cache, use_cache=True)
        for _ in range(reps):
            for mode in ("linear", "skinny"):
                for m in skinny:
                    m.__class__ = SkinnyLinear if mode == "skinny" else torch.nn.Linear
                for n in sizes:
                    t = time.perf_counter()
                    target(input_ids=ctx[:, :n], cache=cache, use_cache=True).logits.sum().item()
                    times[mode][n].append(time.perf_counter() - t)
                    rollback(cache, context)
        for m in skinny:
            m.__class__ = SkinnyLinear
    med = {mode: {n: statistics.median(v) * 1000 for n, v in d.items()} for mode, d in times.items()}
    return {mode: {str(n): round(ms, 1) for n, ms in d.items()} for mode, d in med.items()} | {
        "ratio_to_one_token": {mode: {str(n): round(d[n] / d[sizes[0]], 2) for n in sizes} for mode, d in med.items()}}
