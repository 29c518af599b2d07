"""Compare grammar engines for onspec's structured outputs on the real SmolLM2 tokenizer.

    .venv/bin/python scripts/bench_grammar.py [--engines xgrammar,llguidance,outlines-core] [--reps 3]

For each installed engine: compile time of json_object and of a moderately complex schema (cold: a fresh
compiler/tokenizer each time, so no cache hit), and the per-position mask cost while walking a valid JSON
document token by token (fill the mask, then accept the token), plus whether the matcher can roll back.
The numbers feed docs/structured_outputs.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
DOC_SCHEMA = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "role": "admin",
              "tags": ["math", "engines"], "address": {"street": "12 St James's Square", "city": "London",
                                                       "zip": "12345"}, "active": True, "score": 9.5}
DOC_OBJECT = {"id": 17, "items": [{"sku": "A-1", "qty": 2, "price": 3.25}, {"sku": "B-7", "qty": 1, "price": 10}],
              "note": "deliver after 5pm, ring twice", "paid": False, "meta": {"source": "web", "tags": []}}


def load_tokenizer():
    from transformers import AutoTokenizer

    from onspec.actors.models import converted_model_dir
    from onspec.actors.config import OnspecConfig

    cfg = OnspecConfig(data_dir=Path(".onspec-data"))
    return AutoTokenizer.from_pretrained(converted_model_dir(cfg.model, cfg.data_dir), local_files_only=True)


def timed(fn, reps):
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def walk(ids, fill, accept):
    """(mean, max) seconds of fill() per position over the document, and the fraction of tokens accepted."""
    times, ok = [], 0
    for tid in ids:
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        if not accept(tid):
            break
        ok += 1
    return (statistics.mean(times), max(times)), ok / len(ids)


def bench_xgrammar(tok, vocab, docs, reps):
    import xgrammar as xgr

    info, t_tok = timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab), 1)
    compilers = lambda: xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)  # noqa: E731
    g_obj, t_obj = timed(lambda: compilers().compile_builtin_json_grammar(), reps)
    g_sch, t_sch = timed(lambda: compilers().compile_json_schema(json.dumps(SCHEMA), strict_mode=True), reps)
    res = {"compile json_object ms": t_obj * 1e3, "compile schema ms": t_sch * 1e3,
           "tokenizer setup ms": t_tok * 1e3}
    mask = xgr.allocate_token_bitmask(1, vocab)
    for name, g in (("json_object", g_obj), ("schema", g_sch)):
        m = xgr.GrammarMatcher(g)
        per, frac = walk(docs[name], lambda: m.fill_next_token_bitmask(mask), m.accept_token)
        res[f"mask {name} us"], res[f"max {name} us"], res[f"accepted {name}"] = per[0] * 1e6, per[1] * 1e6, frac
        m.rollback(5)  # raises if unsupported
    res["rollback"] = "yes (GrammarMatcher.rollback, unlimited)"
    return res


def bench_llguidance(tok, vocab, docs, reps):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    lltok, t_tok = timed(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab), 1)

    def compile_(grammar):
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    obj = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    sch = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    _, t_obj = timed(lambda: compile_(obj), reps)
    _, t_sch = timed(lambda: compile_(sch), reps)
    res = {"compile json_object ms": t_obj * 1e3, "compile schema ms": t_sch * 1e3,
           "tokenizer setup ms": t_tok * 1e3}
    mask = lt.allocate_token_bitmask(1, vocab)
    for name, g in (("json_object", obj), ("schema", sch)):
        m = compile_(g)
        per, frac = walk(docs[name], lambda: lt.fill_next_token_bitmask(m, mask), m.consume_token)
        res[f"mask {name} us"], res[f"max {name} us"], res[f"accepted {name}"] = per[0] * 1e6, per[1] * 1e6, frac
        assert m.rollback(5)
    res["rollback"] = "yes (LLMatcher.rollback)"
    return res


def byte_level_alphabet() -> dict[int, str]:
    # GPT-2's byte-to-printable-char table (no longer exported by transformers 5).
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def outlines_vocabulary(tok):
    import outlines_core as oc
    dec = {v: k for k, v in byte_level_alphabet().items()}
    special = set(tok.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for s, i in tok.get_vocab().items():
        if i in special:
            continue
        table.setdefault(bytes(dec[c] for c in s) if all(c in dec for c in s) else s.encode(), []).append(i)
    return oc.Vocabulary(tok.eos_token_id, table)


def bench_outlines(tok, vocab, docs, reps):
    import outlines_core as oc

    voc, t_tok = timed(lambda: outlines_vocabulary(tok), 1)
    # No recursive grammar here: {"type": "object"} becomes a regex with bounded nesting depth.
    r_obj = oc.json_schema.build_regex_from_schema(json.dumps({"type": "object"}))
    r_sch = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    i_obj, t_obj = timed(lambda: oc.Index(r_obj, voc), reps)
    i_sch, t_sch = timed(lambda: oc.Index(r_sch, voc), reps)
    res = {"compile json_object ms": t_obj * 1e3, "compile schema ms": t_sch * 1e3,
           "tokenizer setup ms": t_tok * 1e3}
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    for name, idx in (("json_object", i_obj), ("schema", i_sch)):
        g = oc.Guide(idx)

        def accept(t, g=g):
            try:
                g.advance(t, return_tokens=False)
                return True
            except Exception:
                return False
        per, frac = walk(docs[name], lambda: g.write_mask_into(mask.data_ptr(), mask.numel(), 4), accept)
        res[f"mask {name} us"], res[f"max {name} us"], res[f"accepted {name}"] = per[0] * 1e6, per[1] * 1e6, frac
        g.rollback_state(2)
    res["rollback"] = "yes (Guide.rollback_state)"
    return res


def round_costs(tok, vocab, docs, ks=(4, 5, 6, 7, 8), rounds=200):
    """What a speculative round pays in actors/grammar.py at draft length k: the k+1 masks (packed, or
    unpacked to bool), -inf on the [k+1, V] target logits, and committing the emitted tokens."""
    from onspec.actors.grammar import GrammarCompiler, mask_logits_

    compiled = GrammarCompiler(tok, vocab_size=vocab).compile_schema(SCHEMA, strict=True)
    doc = docs["schema"]
    out = {}
    for k in ks:
        t_pack = t_bool = t_apply = t_commit = 0.0
        logits = torch.zeros(k + 1, vocab)
        for r in range(rounds):
            c = compiled.constraint() if r % 8 == 0 else c
            pos = (r % 8) * 2  # commit 2 tokens a round: a typical accepted prefix + bonus
            drafts = doc[pos:pos + k]
            t = time.perf_counter()
            c.bitmasks_for(drafts)
            t_pack += time.perf_counter() - t
            t = time.perf_counter()
            masks = c.masks_for(drafts)
            t_bool += time.perf_counter() - t
            t = time.perf_counter()
            mask_logits_(logits, masks[:, :vocab])
            t_apply += time.perf_counter() - t
            t = time.perf_counter()
            c.commit(doc[pos:pos + 2])
            t_commit += time.perf_counter() - t
        out[k] = {n: round(v / rounds * 1e6, 1) for n, v in
                  (("packed us", t_pack), ("bool us", t_bool), ("mask_logits_ us", t_apply), ("commit us", t_commit))}
    return out


ENGINES = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", action="store_true", help="also the per-round cost of actors/grammar.py")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    vocab = 49152
    docs = {"json_object": tok.encode(json.dumps(DOC_OBJECT), add_special_tokens=False),
            "schema": tok.encode(json.dumps(DOC_SCHEMA), add_special_tokens=False)}
    print(f"tokens walked: json_object {len(docs['json_object'])}, schema {len(docs['schema'])}")
    for name in args.engines.split(","):
        try:
            res = ENGINES[name](tok, vocab, docs, args.reps)
        except Exception as e:  # report and go on: one broken engine should not hide the others
            res = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}))
    if args.rounds:
        for k, res in round_costs(tok, vocab, docs).items():
            print(f"round k={k}", json.dumps(res))


if __name__ == "__main__":
    main()
