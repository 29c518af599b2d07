"""What the base drafter's pretraining reads and answers besides the template prompts (actors/pretrain.py):
local text files every machine with Python has, code tasks in the words of the standard library's docstrings,
and requests the target writes itself (``--written-requests``)."""
from __future__ import annotations

import json
import random
import re
import sys
import sysconfig
from pathlib import Path

import torch

from onspec.actors.pretrain_prompts import pretrain_prompts

REQUESTS = "requests.jsonl"


def local_text_files() -> list[Path]:
    """Python sources that every machine with Python has: the standard library (its tests excluded: generated
    junk and odd encodings), and pydoc's topics, which hold the language reference as prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
             if "test" not in p.parts[-2] and not p.name.startswith("test")]
    topics = root / "pydoc_data" / "topics.py"
    return ([topics] if topics.is_file() else []) + files


def batched_generate(target, tokenizer, enc: list[list[int]], **kw) -> torch.Tensor:
    """One ``generate`` over token lists of different lengths, left-padded: the new tokens [b, max_new_tokens]
    (the pad id after a row ended)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, enc))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in enc])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in enc])
    return target.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **kw)[:, width:]


_CODE_ASKS = ("Write a Python function {name}({args}) that does this: {what}",
              "Write a Python function that does the following. {what}",
              "How would I write this in Python? {what}",
              "Implement {name} in Python: {what}")


def docstring_tasks(seed: int) -> list[str]:
    """Code requests in the words of the standard library's own documentation: for each public module-level
    function, the first sentence of its docstring, asked for in one of a few phrasings (seeded order). Template
    code prompts repeat a few dozen task shapes; these are a thousand, written by many authors."""
    import ast

    out = []
    for f in local_text_files():
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            what = re.split(r"(?<=[.!?])\s", doc.strip().split("\n\n")[0].replace("\n", " "))[0].strip()
            if 4 <= len(what.split()) <= 30 and what[0].isupper() and not any(c in what for c in ">:%`*|{}"):
                out.append((node.name, ", ".join(a.arg for a in node.args.args), what))
    out = sorted(set(out))  # posixpath and ntpath document the same functions alike
    rng = random.Random(seed)
    rng.shuffle(out)
    return list(dict.fromkeys(rng.choice(_CODE_ASKS).format(name=n, args=a, what=w) for n, a, w in out))


def mixed_prompts(templates: list[list[dict]], tasks: list[str], share: float) -> list[list[dict]]:
    """The templates with the docstring code tasks spread evenly among them, ``share`` of the result, until
    the tasks run out (templates only after that)."""
    if not 0 <= share < 1:
        raise ValueError(f"docstring_share must be in [0, 1), not {share}")
    out, left, credit = [], list(reversed(tasks)), 0.0
    for t in templates:
        out.append(t)
        credit += share / (1 - share)  # tasks owed per template
        while credit >= 1.0 and left:
            credit -= 1.0
            out.append([{"role": "user", "content": left.pop()}])
    return out


_NUMBERED = re.compile(r"^\s*(\d{1,2})[.)]\s+(.*\S)\s*$")


def parse_listed_requests(text: str, examples: list[str]) -> list[str]:
    """The requests in a continuation of a numbered list: its first line (the item the prompt left open), then
    every numbered line; an item must end in a newline (the last may be cut off by the token budget), read like
    a request (3-60 words) and not repeat an example."""
    lines = text.split("\n")[:-1]
    if not lines:
        return []
    items = [lines[0].strip()] + [m.group(2) for m in map(_NUMBERED.match, lines[1:]) if m]
    seen = {e.strip().lower() for e in examples}
    out = []
    for it in items:
        if 3 <= len(it.split()) <= 60 and any(c.isalpha() for c in it) and it.lower() not in seen:
            seen.add(it.lower())
            out.append(it)
    return out


@torch.inference_mode()
def write_requests(plan, target, tokenizer) -> list[str]:
    """``plan.written_requests`` requests in the target's own words (requests.jsonl, resumable): each batch row
    is a plain-text numbered list of three template prompts of one kind (chat or code) that the target
    continues, sampled. The templates alone leave the drafter strong on their phrasings and weaker on
    anyone else's (BENCHMARKS.md: 0.63 top-1 on held-out template answers, 0.45-0.49 on prompts written
    elsewhere); a list continued by the target keeps each kind's mix of topics while the wording is new."""
    path = plan.out / REQUESTS
    done = [json.loads(x)["content"] for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if len(done) >= plan.written_requests:
        return done[:plan.written_requests]
    pool = [m[-1]["content"].split("\n")[0][:160] for m in pretrain_prompts(seed=plan.seed)]
    kinds = [pool[0::2], pool[1::2]]  # pretrain_prompts interleaves chat and code
    seen = set(map(str.lower, done))
    from tqdm import tqdm

    bar = tqdm(total=plan.written_requests, initial=len(done), desc="target-written requests", file=sys.stderr)
    batch_no = len(done)  # a resumed run draws other examples and samples
    barren = 0
    while len(done) < plan.written_requests and barren < 5:  # a target that writes no requests stops the stage
        rng = random.Random(plan.seed * 1_000_003 + batch_no)
        examples = [rng.sample(kinds[r % 2], 3) for r in range(plan.gen_batch)]
        texts = ["Messages people sent to an assistant today:\n" + "".join(f"{j + 1}. {e}\n" for j, e in enumerate(ex))
                 + "4." for ex in examples]
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        torch.manual_seed(plan.seed * 1_000_003 + batch_no)
        gen = batched_generate(target, tokenizer, enc, max_new_tokens=80, do_sample=True, temperature=1.0,
                               top_p=0.95)
        new = []
        for ex, row in zip(examples, gen):
            for req in parse_listed_requests(tokenizer.decode(row, skip_special_tokens=True), ex):
                if req.lower() not in seen:
                    seen.add(req.lower())
                    new.append(req)
        new = new[:plan.written_requests - len(done)]
        with path.open("a") as f:
            f.writelines(json.dumps({"content": r}) + "\n" for r in new)
        done += new
        barren = 0 if new else barren + 1
        batch_no += plan.gen_batch
        bar.update(len(new))
    bar.close()
    if len(done) < plan.written_requests:
        print(f"the target wrote {len(done)} usable requests of {plan.written_requests}; answering those",
              file=sys.stderr, flush=True)
    return done
