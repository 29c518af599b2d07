"""`onspec bench decode`: target-only and speculative decoding on the same prompts, side by side."""
from __future__ import annotations

import copy

import torch

from onspec.actors.draft_control import DraftController
from onspec.actors.engine import SpeculativeEngine
from onspec.actors.requests import SamplingParams
from onspec.actors.prompts import PromptSpec
from onspec.cluster.bench.peers import agreement
from onspec.kernels.draft_length import best_draft_length


def _mode_state(engine: SpeculativeEngine, source: str, drafter=None, draft_cost: float | None = None) -> dict:
    """What one decoding mode keeps to itself in a side-by-side run: its drafter and that drafter's measured
    cost, its draft-length controller (acceptance estimate), the suffix index (fed only with this mode's own
    earlier outputs, so every mode sees the same history) and the suffix source's calibration."""
    ctl = DraftController(engine.spec)
    ctl.verify_cost = list(engine.controller.verify_cost)
    ctl.draft_cost = engine.controller.draft_cost if draft_cost is None else draft_cost
    return {"spec": engine.spec.model_copy(update={"source": source}), "controller": ctl, "trust": 1.0,
            "drafter": engine.drafter if drafter is None else drafter,
            "index": copy.deepcopy(engine.suffix_index)}  # the history the engine had when the run began


def _drafter_cost(engine: SpeculativeEngine, drafter) -> float:
    """``drafter``'s cost per token as the engine's calibration measures it (the engine's own drafter is put
    back afterwards, its measured costs with it)."""
    own, ctl = engine.drafter, engine.controller
    saved = list(ctl.verify_cost), ctl.draft_cost
    engine.drafter = drafter
    try:
        engine.calibrate()
        return engine.controller.draft_cost
    finally:
        engine.drafter = own
        ctl.verify_cost, ctl.draft_cost = saved


def _run_mode(engine: SpeculativeEngine, state: dict, ids: list[int], params: SamplingParams):
    engine.spec, engine.controller, engine.suffix_index = state["spec"], state["controller"], state["index"]
    engine.suffix_trust = state["trust"]
    # Assigned, not set_drafter: that would reset this mode's own acceptance estimate.
    engine.drafter = state["drafter"]
    g = engine.generate(ids, params, speculate=True)
    state["trust"] = engine.suffix_trust
    return g


def _hf_generate(engine: SpeculativeEngine, ids: list[int], max_tokens: int, lookup: int | None):
    """transformers' own greedy generate, plain or with prompt-lookup decoding (Saxena 2023): the reference
    implementation of the model-free drafting the suffix source generalises."""
    import time

    import torch

    x = torch.tensor([ids], device=engine.device)
    kw = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(engine.stop_ids) or None,
              pad_token_id=sorted(engine.stop_ids)[0] if engine.stop_ids else 0)
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    t = time.perf_counter()
    with torch.inference_mode():
        out = engine.target.generate(x, **kw)[0, len(ids):].tolist()
    return out, time.perf_counter() - t


def bench_decode(engine: SpeculativeEngine, specs: list[PromptSpec], max_tokens: int, repeats: int = 1,
                 sources: tuple[str, ...] | None = None, prompt_lookup: int = 0, log=lambda *_: None,
                 drafters: dict | None = None, response_format: dict | None = None, peers: dict | None = None) -> dict:
    """Target-only and speculative decoding with each draft source, interleaved prompt by prompt (so drift in
    machine load hits all alike), after one excluded warm-up of each. Greedy, so every speculative output must
    equal the target's token for token. With ``prompt_lookup`` > 0, transformers' generate with
    prompt-lookup decoding (that many tokens) and without it run on the same prompts too. ``drafters``
    ({name: drafter}, e.g. the other kind, or checkpoints trained as long) run in the same interleaving with
    the first source, each with its own measured cost, in place of the engine's drafter.

    With ``response_format`` (structured output: json_object or json_schema) every mode decodes under the
    grammar, and ``grammar`` reports what masking costs per token.

    ``peers`` ({name: peer}, cluster/bench/peers.py: e.g. llama.cpp on the same GGUF) decode every prompt in the
    same interleaving, plainly and with their prompt-lookup drafting; ``peers`` reports their tokens/s, onspec's
    against them, and how far their greedy text agrees with onspec's target-only.

    The top-level figures are those of the first source with the engine's drafter; ``sources`` holds every
    source's, ``drafters`` every extra drafter's."""
    sources = tuple(sources or (engine.spec.source,))
    drafters = {name: engine.for_serving(d) for name, d in (drafters or {}).items()}
    clash = set(drafters) & {"target", *sources}
    if clash:
        raise ValueError(f"drafter names {sorted(clash)} clash with the draft sources'")
    prompts = [engine.encode(s.prompt, s.messages) for s in specs]
    for ids in prompts:
        engine.check_prompt(ids)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, response_format=response_format)
    saved = engine.spec, engine.controller, engine.suffix_index, engine.suffix_trust, engine.drafter
    if engine.spec.cost_aware and engine.spec.mode == "adaedl":
        engine.spec = engine.spec.model_copy(update={"source": "hybrid"})  # measures the suffix lengths too
    # In fixed mode too: the report's drafter cost and predicted speedups are read from the measured costs.
    engine.calibrate()
    states = {src: _mode_state(engine, src) for src in sources}
    for name, d in drafters.items():
        states[name] = _mode_state(engine, sources[0], d, _drafter_cost(engine, d))
    modes_run = (*sources, *drafters)
    warm = SamplingParams(max_tokens=8, response_format=response_format)
    engine.generate(prompts[0], warm, speculate=False)
    for name, st in states.items():  # on throwaway copies: the measured runs start from the same state
        _run_mode(engine, _mode_state(engine, st["spec"].source, st["drafter"], st["controller"].draft_cost),
                  prompts[0], warm)
    if prompt_lookup:
        _hf_generate(engine, prompts[0], 8, None)
        _hf_generate(engine, prompts[0], 8, prompt_lookup)
    peers = dict(peers or {})
    peer_runs = {name: {"plain": [0, 0.0], "lookup": [0, 0.0], "agreement": []} for name in peers}
    for peer in peers.values():
        for lookup in (False, True):
            peer.generate(prompts[0], 8, engine.stop_ids, lookup)
    keys = ("tokens", "seconds", "drafted", "accepted", "forwards")
    totals = {m: dict.fromkeys(keys, 0) for m in ("target", *modes_run)}
    by_source = {src: {s: [0, 0, 0] for s in ("model", "suffix", "none")} for src in modes_run}
    hf = {"plain": [0, 0.0], "lookup": [0, 0.0]}
    identical = {src: True for src in modes_run}
    hf_identical = True
    per_prompt, outputs = [], []
    try:
        for _ in range(repeats):
            for spec, ids in zip(specs, prompts):
                runs = {"target": engine.generate(ids, params, speculate=False)}
                outputs.append(runs["target"].token_ids)
                for src in modes_run:
                    runs[src] = _run_mode(engine, states[src], ids, params)
                    for s, v in runs[src].stats.sources.items():
                        by_source[src][s] = [a + b for a, b in zip(by_source[src][s], v)]
                for mode, g in runs.items():
                    tot = totals[mode]
                    for key, val in zip(keys, (g.stats.completion_tokens, g.stats.elapsed_s, g.stats.drafted,
                                               g.stats.accepted, g.stats.target_forwards)):
                        tot[key] += val
                row = {"id": spec.id, "target_tokens_per_s": round(runs["target"].stats.tokens_per_s, 3)}
                for src in modes_run:
                    same = runs[src].token_ids == runs["target"].token_ids
                    identical[src] &= same
                    row[src] = {"tokens_per_s": round(runs[src].stats.tokens_per_s, 3),
                                "acceptance_rate": round(runs[src].stats.acceptance_rate, 4), "identical": same}
                if prompt_lookup:
                    ref = runs["target"].token_ids
                    for name, n in (("plain", None), ("lookup", prompt_lookup)):
                        out, secs = _hf_generate(engine, ids, max_tokens, n)
                        hf[name][0] += len(out)
                        hf[name][1] += secs
                        hf_identical &= out[:len(ref)] == ref
                    row["hf_lookup_tokens_per_s"] = round(len(out) / secs, 3)
                for name, peer in peers.items():
                    for how in ("plain", "lookup"):
                        out, secs = peer.generate(ids, max_tokens, engine.stop_ids, how == "lookup")
                        peer_runs[name][how][0] += len(out)
                        peer_runs[name][how][1] += secs
                        row[f"{name}_{how}_tokens_per_s"] = round(len(out) / secs, 3)
                    peer_runs[name]["agreement"].append(agreement(out, runs["target"].token_ids))
                per_prompt.append(row)
                log(row)
    finally:
        engine.spec, engine.controller, engine.suffix_index, engine.suffix_trust, engine.drafter = saved
    t = totals["target"]
    t_tps = t["tokens"] / t["seconds"]
    ctl = states[sources[0]]["controller"]
    modes = {}
    for src in modes_run:
        s = totals[src]
        s_tps = s["tokens"] / s["seconds"]
        modes[src] = {"tokens_per_s": round(s_tps, 3), "speedup": round(s_tps / t_tps, 4),
                      "acceptance_rate": round(s["accepted"] / s["drafted"], 4) if s["drafted"] else 0.0,
                      "tokens_per_step": round(s["tokens"] / s["forwards"], 4), "drafted": s["drafted"],
                      "accepted": s["accepted"], "identical": identical[src],
                      "by_source": {k: dict(zip(("rounds", "drafted", "accepted"), v))
                                    for k, v in by_source[src].items()}}
    first = modes[sources[0]]
    k = engine.spec.max_draft if engine.spec.mode == "adaedl" else engine.spec.fixed_k
    _, predicted = best_draft_length(first["acceptance_rate"], ctl.draft_cost, ctl.verify_cost, k)
    result = {
        "target_tokens_per_s": round(t_tps, 3),
        "spec_tokens_per_s": first["tokens_per_s"],
        "speedup": first["speedup"],
        "acceptance_rate": first["acceptance_rate"],
        "tokens_per_step": first["tokens_per_step"],
        "identical": all(identical.values()),
        "drafted": first["drafted"],
        "accepted": first["accepted"],
        "drafter_version": getattr(engine.drafter, "version", None),
        "drafter_kind": getattr(engine.drafter, "kind", None),
        "drafter_cost_per_token_ms": round(ctl.draft_cost * 1000, 2),
        "target_forward_ms": [round(c * 1000, 1) for c in ctl.verify_cost],
        "drafter_cost_ratio": round(ctl.draft_cost / ctl.verify_cost[0], 4),
        "predicted_speedup": round(predicted, 4),
        # What the measured costs would pay at other acceptance rates (Leviathan et al. eq. 1, best k): the
        # acceptance a drafter must reach for a given speedup on this machine.
        "predicted_speedup_by_acceptance": {
            f"{a:.1f}": round(best_draft_length(a, ctl.draft_cost, ctl.verify_cost, k)[1], 3)
            for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)},
        "sources": {src: modes[src] for src in sources},
        "prompts": per_prompt,
    }
    if drafters:
        result["drafters"] = {}
        for name, d in drafters.items():
            cost = states[name]["controller"].draft_cost
            result["drafters"][name] = {**modes[name], "source": sources[0], "kind": getattr(d, "kind", None),
                                        "drafter_version": getattr(d, "version", None),
                                        "drafter_cost_per_token_ms": round(cost * 1000, 2),
                                        "drafter_cost_ratio": round(cost / ctl.verify_cost[0], 4)}
    if response_format:
        result["grammar"] = {"response_format": response_format,
                             "mask_us_per_token": mask_cost(engine, response_format, outputs)}
    if prompt_lookup:
        plain, look = hf["plain"][0] / hf["plain"][1], hf["lookup"][0] / hf["lookup"][1]
        result["prompt_lookup"] = {"num_tokens": prompt_lookup, "hf_tokens_per_s": round(plain, 3),
                                   "hf_lookup_tokens_per_s": round(look, 3), "speedup": round(look / plain, 4),
                                   "vs_target_only": round(look / t_tps, 4), "identical": hf_identical}
    if peers:
        result["peers"] = {}
        for name, r in peer_runs.items():
            plain, look = r["plain"][0] / r["plain"][1], r["lookup"][0] / r["lookup"][1]
            result["peers"][name] = {
                "tokens_per_s": round(plain, 3), "lookup_tokens_per_s": round(look, 3),
                "onspec_target_vs_peer": round(t_tps / plain, 4),
                "onspec_default_vs_peer": round(first["tokens_per_s"] / plain, 4),
                "onspec_default_vs_peer_lookup": round(first["tokens_per_s"] / look, 4),
                "agreement_with_target": round(sum(r["agreement"]) / len(r["agreement"]), 4)}
    return result


def mask_cost(engine: SpeculativeEngine, response_format: dict, outputs: list[list[int]]) -> float:
    """Microseconds per token that structured output adds to a round: the grammar's mask for the position,
    applied to a vocabulary of logits, and the matcher advanced over the token, replayed along real outputs."""
    import time

    logits = torch.zeros(1, engine.vocab_size)
    n, spent = 0, 0.0
    for out in outputs:
        c = engine._constraint(response_format, [])
        for tok in out:
            if tok in engine.stop_ids:
                break
            t = time.perf_counter()
            logits.masked_fill(~c.masks_for([]), float("-inf"))
            c.commit([tok])
            spent += time.perf_counter() - t
            n += 1
    return round(spent / max(n, 1) * 1e6, 2)


def bench_forward(target, sizes=(1, 2, 3, 4, 5, 7, 9), reps: int = 5, context: int = 64) -> dict:
    """Target forward time over n new tokens (with a KV cache of ``context``), nn.Linear vs SkinnyLinear, and
    where the target serves compiled layers, the same with its eager layers ("eager_layers"), interleaved per
    repetition; the median of ``reps``. "skinny" is the served path."""
    import statistics
    import time

    from onspec.actors.row_cache import RowCache, body_forward
    from onspec.actors.skinny_linear import SkinnyLinear

    skinny = [m for m in target.modules() if isinstance(m, SkinnyLinear)]
    body = target.model
    compiled = getattr(body, "compiled_layers", None)
    modes = ("linear", "skinny") + (("eager_layers",) if compiled is not None else ())
    ctx = torch.arange(1, context + 1).unsqueeze(0)
    times = {mode: {n: [] for n in sizes} for mode in modes}
    with torch.inference_mode():
        # The engine's own path: a position-indexed cache holding the context; each measured forward writes
        # past it, and the next one overwrites the same positions (a rejection only moves a length).
        cache = RowCache(body, 1, context + max(sizes))
        body_forward(body, body.embed_tokens(ctx), cache, 0, torch.tensor([0]))
        held = torch.tensor([context])
        for _ in range(reps):
            for mode in modes:
                for m in skinny:
                    m.__class__ = torch.nn.Linear if mode == "linear" else SkinnyLinear
                body.compiled_layers = None if mode == "eager_layers" else compiled
                for n in sizes:
                    t = time.perf_counter()
                    target.lm_head(body_forward(body, body.embed_tokens(ctx[:, :n]), cache, 0, held)).sum().item()
                    times[mode][n].append(time.perf_counter() - t)
        for m in skinny:
            m.__class__ = SkinnyLinear
        body.compiled_layers = compiled
    med = {mode: {n: statistics.median(v) * 1000 for n, v in d.items()} for mode, d in times.items()}
    mb, gbs = weight_bytes_per_token(target) / 1e6, memory_bandwidth_gbs()
    floor = mb / gbs  # ms: every weight read once per token, at the rate this machine streams memory
    return {mode: {str(n): round(ms, 1) for n, ms in d.items()} for mode, d in med.items()} | {
        "ratio_to_one_token": {mode: {str(n): round(d[n] / d[sizes[0]], 2) for n in sizes} for mode, d in med.items()},
        "weight_mb_per_token": round(mb, 1), "bandwidth_gb_s": round(gbs, 1), "floor_ms": round(floor, 2),
        "forward_1_vs_floor": round(med["skinny"][sizes[0]] / floor, 2), "compiled_layers": compiled is not None}


def weight_bytes_per_token(target) -> int:
    """Bytes of weights one decoding step reads: every linear (packed 4-bit codes and their scales, or float
    weights) and norm; the input embedding contributes one row, left out."""
    from onspec.actors.int4_linear import Int4Linear, Q8Head

    total = 0
    for m in target.modules():
        if isinstance(m, (Int4Linear, Q8Head)):
            total += sum(b.numel() * b.element_size() for b in (m.packed, m.scales_and_zeros))
        elif isinstance(m, torch.nn.Linear) or type(m).__name__.endswith("RMSNorm"):
            total += m.weight.numel() * m.weight.element_size()
    return total


def memory_bandwidth_gbs(mib: int = 512, reps: int = 3) -> float:
    """GB/s at which this machine reads memory: the best of ``reps`` sums over a buffer far larger than cache."""
    import time

    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9
