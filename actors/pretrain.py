"""`onspec drafter pretrain`: the base feature drafter, densely distilled from the target before it is served
(EAGLE, arXiv 2401.15077, trains its drafter offline the same way; DistillSpec, arXiv 2310.08461, on
target-written text).

Data, all made on this machine (``out`` keeps every stage, so an interrupted run resumes where it stopped):

  0. requests.jsonl  (with ``written_requests``) requests the target writes itself, continuing numbered lists of
                   template prompts: phrasings no template has. The answers are then written to these and, in
                   turn, to code tasks in the standard library's docstrings' words, instead of the templates.
  1. corpus.jsonl  local text (the Python standard library's sources and its pydoc topics, cut into windows) and
                   the target's own answers to a broad prompt set (actors/pretrain_prompts.py), written with
                   batched ``generate``, so that the target writes hundreds of tokens/s instead of one stream's 15.
     Then the drafter's kept vocabulary is re-chosen: the tokens the target wrote most in those answers.
  2. teacher/      one target forward per window, at the served precision: at every position its top-k
                   probabilities over the drafter's kept vocabulary, its greedy token and its last hidden state.
  3. state.pt      the drafter's weights and optimizer state, saved every minute while training.

Training: at every position i of a window, forward KL from the target's distribution at i to the drafter's (the
sparse teacher of kernels.losses.sparse_forward_kl), plus EAGLE's smooth-L1 regression of the target's hidden
state h_i, teacher-forced on the target's features h_{i-1} with a little uniform noise (EAGLE's recipe: the
drafter reads its own, imperfect predictions when it drafts ahead). The head (the target's output embeddings of
the kept ids) and the embedding stay frozen, so a checkpoint holds only the fused input, the decoder layer and
the norm: it ships in fp16 with the head shared (actors/checkpoint.save_checkpoint).

Held out: every 20th corpus sequence is never trained on; the manifest records the drafter's top-1 agreement
with the target there (teacher-forced, the acceptance of a 1-token draft), at the start and as training goes.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from onspec.actors.feature_drafter import shift_features
from onspec.actors.pretrain_prompts import pretrain_prompts
from onspec.actors.pretrain_sources import (batched_generate, docstring_tasks, local_text_files, mixed_prompts,
                                            write_requests)
from onspec.kernels.losses import sparse_forward_kl

CORPUS = "corpus.jsonl"
TEACHER = "teacher"
STATE = "state.pt"
SHARD = 256  # windows per teacher shard


@dataclass
class PretrainPlan:
    """What `onspec drafter pretrain` makes. ``minutes`` counts training time only (over resumed runs too);
    the data stages are bounded by their token budgets."""
    out: Path
    minutes: float = 20.0
    tokens: int = 200_000          # target-written answer tokens
    local_tokens: int = 100_000    # local text tokens (teacher-forced)
    window: int = 256
    max_new_tokens: int = 192
    gen_batch: int = 48
    sampled_share: float = 0.25    # answers sampled at temperature 0.7 instead of greedy (variety)
    batch: int = 8                 # windows per optimizer step
    lr: float = 5e-4
    topk: int = 32
    feature_loss_weight: float = 0.1
    feature_noise: float = 0.1     # EAGLE: U(-a, a) added to the input features while training
    eval_every_s: float = 120.0
    seed: int = 0
    vocab_from_corpus: bool = True  # re-choose the kept vocabulary from the answers' token counts
    written_requests: int = 0      # > 0: answer this many target-written requests, and docstring code tasks in
                                   # turn, instead of the templates
    docstring_share: float = 0.0   # templates with this share of standard-library docstring code tasks mixed in
    bulk_rows: int = 32            # answers generated with bf16 matmuls from this many rows (0: the 4-bit kernel)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1. the corpus ------------------------------------------------------------------------------------------------
def _read_corpus(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by an interrupted run: everything after it is redone
    return out


def local_windows(tokenizer, budget: int, window: int, seed: int) -> list[dict]:
    """Up to ``budget`` tokens of local text in windows of ``window`` tokens, files in a seeded order (the pydoc
    topics first: they are the only long English prose)."""
    files = local_text_files()
    rng = random.Random(seed)
    files = files[:1] + rng.sample(files[1:], len(files) - 1)
    out, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # pydoc topics: take windows across the whole file, not just its start
        cap = budget // 3 if f.name == "topics.py" else budget // 40
        for i in range(0, min(len(ids), cap), window):
            chunk = ids[i:i + window]
            if len(chunk) < 32:
                break
            out.append({"source": "local", "ids": chunk, "prompt_len": 0})
            total += len(chunk)
            if total >= budget:
                return out
    return out


@torch.inference_mode()
def generate_answers(target, tokenizer, prompts: list[list[dict]], temperature: float,
                     max_new_tokens: int) -> list[dict]:
    """The target's answers to a batch of chat prompts (left-padded, one batched ``generate``)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]) for m in prompts]
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    gen = batched_generate(target, tokenizer, enc, max_new_tokens=max_new_tokens, **kw)
    eos = set(target.generation_config.eos_token_id if isinstance(target.generation_config.eos_token_id, list)
              else [target.generation_config.eos_token_id]) | {pad}
    out = []
    for p, row in zip(enc, gen.tolist()):
        end = next((i for i, t in enumerate(row) if t in eos), None)
        row = row if end is None else row[:end + 1]  # keep the stop token: the drafter learns to end too
        out.append({"source": "answer", "ids": p + row, "prompt_len": len(p), "temperature": temperature})
    return out


def build_corpus(plan: PretrainPlan, target, tokenizer) -> list[dict]:
    """Make (or finish making) corpus.jsonl; returns its sequences."""
    path = plan.out / CORPUS
    corpus = _read_corpus(path)
    path.write_text("".join(json.dumps(c) + "\n" for c in corpus))  # drop a cut-off last line
    if not any(c["source"] == "local" for c in corpus) and plan.local_tokens > 0:
        local = local_windows(tokenizer, plan.local_tokens, plan.window, plan.seed)
        with path.open("a") as f:
            f.writelines(json.dumps(c) + "\n" for c in local)
        corpus += local
        _say(f"local text: {len(local)} windows, {sum(len(c['ids']) for c in local)} tokens")
    answers = [c for c in corpus if c["source"] == "answer"]
    written = sum(len(c["ids"]) - c["prompt_len"] for c in answers)
    if plan.written_requests > 0:  # the target's own requests and the library's code tasks, in turn
        asks = [r for pair in itertools.zip_longest(write_requests(plan, target, tokenizer),
                                                    docstring_tasks(plan.seed)) for r in pair if r]
        prompts = [[{"role": "user", "content": r}] for r in asks]
    else:
        prompts = pretrain_prompts(seed=plan.seed)
        if plan.docstring_share > 0:
            prompts = mixed_prompts(prompts, docstring_tasks(plan.seed), plan.docstring_share)
    done = len(answers)
    from tqdm import tqdm

    bar = tqdm(total=plan.tokens, initial=min(written, plan.tokens), desc="target answers (tokens)",
               unit="tok", file=sys.stderr, disable=plan.tokens <= 0)
    batch_no = done // plan.gen_batch
    while written < plan.tokens and done < len(prompts):
        chunk = prompts[done:done + plan.gen_batch]
        # every 1/sampled_share-th batch sampled, the rest greedy (the served default)
        sampled = plan.sampled_share > 0 and batch_no % max(1, round(1 / plan.sampled_share)) == 1
        new = generate_answers(target, tokenizer, chunk, 0.7 if sampled else 0.0, plan.max_new_tokens)
        with path.open("a") as f:
            f.writelines(json.dumps(c) + "\n" for c in new)
        corpus += new
        done += len(chunk)
        batch_no += 1
        got = sum(len(c["ids"]) - c["prompt_len"] for c in new)
        written += got
        bar.update(got)
    bar.close()
    return corpus


def answer_token_counts(corpus: list[dict], vocab: int) -> torch.Tensor:
    """How often the target wrote each token in the corpus's answers: VocabTrim's statistic (arXiv 2505.22858
    keeps the drafter head's rows for the tokens the target generates most), here over the whole corpus instead
    of the few thousand tokens of the packaged token_counts.json."""
    ids = [t for c in corpus if c["source"] == "answer" for t in c["ids"][c["prompt_len"]:]]
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)[:vocab].double()


@torch.no_grad()
def keep_vocabulary(drafter, target, kept: torch.Tensor) -> None:
    """Point the drafter's VocabTrim head at ``kept``: its rows are the target's output embeddings of those ids
    (frozen in training, shared in the shipped checkpoint), so only the buffer and the rows change."""
    drafter.kept_ids.copy_(kept.to(drafter.kept_ids.device))
    drafter.head.weight.copy_(target.get_output_embeddings().weight[drafter.kept_ids].to(drafter.head.weight.dtype))


# ---- 2. the teacher -----------------------------------------------------------------------------------------------
def corpus_windows(corpus: list[dict], window: int) -> list[tuple[int, list[int]]]:
    """(sequence index, ids) windows of at most ``window`` tokens (a long answer is cut: the target's features
    of each window are computed on that window alone, as the drafter will read them)."""
    out = []
    for s, c in enumerate(corpus):
        ids = c["ids"]
        for i in range(0, len(ids), window):
            if len(ids) - i >= 16:
                out.append((s, ids[i:i + window]))
    return out


@torch.inference_mode()
def score_shard(target, kept: torch.Tensor, windows: list[list[int]], topk: int, batch: int = 8) -> dict:
    """The target at every position of ``windows``, flattened: ids [N], offsets [W+1], top-k indices into
    ``kept`` [N, K] (int16) and their probabilities renormalised over the kept vocabulary [N, K] (float16), the
    greedy token over the full vocabulary [N], and the post-norm last hidden state [N, H] (float16)."""
    ids, idx, probs, argmax, hidden = [], [], [], [], []
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        width = max(map(len, chunk))
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, w in enumerate(chunk):
            x[r, :len(w)] = torch.tensor(w)  # right padding: causal attention leaves real positions alone
        h = target.model(input_ids=x).last_hidden_state
        logits = target.lm_head(h).float()
        top = torch.softmax(logits[..., kept], -1).topk(topk, dim=-1)
        am = logits.argmax(-1)
        for r, w in enumerate(chunk):
            n = len(w)
            ids.append(torch.tensor(w, dtype=torch.int32))
            idx.append(top.indices[r, :n].to(torch.int16))
            probs.append(top.values[r, :n].to(torch.float16))
            argmax.append(am[r, :n].to(torch.int32))
            hidden.append(h[r, :n].to(torch.float16))
    lens = torch.tensor([0] + [len(w) for w in windows])
    return {"ids": torch.cat(ids), "offsets": lens.cumsum(0), "idx": torch.cat(idx), "probs": torch.cat(probs),
            "argmax": torch.cat(argmax), "hidden": torch.cat(hidden)}


def build_teacher(plan: PretrainPlan, target, kept: torch.Tensor, windows: list[list[int]]) -> list[dict]:
    from tqdm import tqdm

    folder = plan.out / TEACHER
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    starts = range(0, len(windows), SHARD)
    for n, start in enumerate(tqdm(starts, desc="teacher (shards)", file=sys.stderr)):
        path = folder / f"shard-{n:05d}.pt"
        part = windows[start:start + SHARD]
        # the top-k indices point into ``kept``: a shard scored for another kept set is stale
        key = zlib.crc32(json.dumps(part).encode() + kept.numpy().tobytes())
        if path.is_file():
            shard = torch.load(path)
            if shard.get("key") == key:
                shards.append(shard)
                continue
        shard = {**score_shard(target, kept, part, plan.topk), "key": key}
        torch.save(shard, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        shards.append(shard)
    return shards


# ---- 3. training --------------------------------------------------------------------------------------------------
class WindowSet:
    """The scored windows as one flat store; ``batch`` pads a list of window numbers into training tensors."""

    def __init__(self, shards: list[dict]):
        cat = lambda k: torch.cat([s[k] for s in shards])  # noqa: E731
        self.ids, self.idx, self.probs = cat("ids"), cat("idx"), cat("probs")
        self.argmax, self.hidden = cat("argmax"), cat("hidden")
        starts, base = [], 0
        for s in shards:
            starts.append(s["offsets"][:-1] + base)
            base += int(s["offsets"][-1])
        self.start = torch.cat(starts)
        self.length = torch.cat([s["offsets"].diff() for s in shards])

    def __len__(self) -> int:
        return int(self.start.numel())

    def tokens(self, rows: list[int]) -> int:
        return int(self.length[rows].sum())

    def batch(self, rows: list[int], dtype: torch.dtype) -> dict:
        width = int(self.length[rows].max())
        b = len(rows)
        k, hdim = self.idx.shape[1], self.hidden.shape[1]
        out = {"x": torch.zeros(b, width, dtype=torch.long), "mask": torch.zeros(b, width, dtype=torch.bool),
               "idx": torch.zeros(b, width, k, dtype=torch.long), "probs": torch.zeros(b, width, k),
               "argmax": torch.zeros(b, width, dtype=torch.long), "h": torch.zeros(b, width, hdim, dtype=dtype)}
        for r, w in enumerate(rows):
            s, n = int(self.start[w]), int(self.length[w])
            sl = slice(s, s + n)
            out["x"][r, :n] = self.ids[sl].long()
            out["mask"][r, 1:n] = True  # position 0 has no predecessor's feature: nothing to learn there
            out["idx"][r, :n] = self.idx[sl].long()
            out["probs"][r, :n] = self.probs[sl].float()
            out["argmax"][r, :n] = self.argmax[sl].long()
            out["h"][r, :n] = self.hidden[sl].to(dtype)
        return out


def pretrain_loss(drafter, b: dict, feature_loss_weight: float, noise: float = 0.0) -> torch.Tensor:
    """Forward KL to the target's sparse distribution at every position + w * smooth-L1(ĥ_i, h_i)."""
    feats = shift_features(b["h"])
    if noise > 0:
        feats = feats + (torch.rand_like(feats) * 2 - 1) * noise
    logits, predicted = drafter(b["x"], feats)
    m = b["mask"]
    loss = sparse_forward_kl(logits[m], b["idx"][m], b["probs"][m])
    if feature_loss_weight > 0:
        loss = loss + feature_loss_weight * torch.nn.functional.smooth_l1_loss(predicted[m].float(),
                                                                               b["h"][m].float())
    return loss


@torch.inference_mode()
def top1_agreement(drafter, data: WindowSet, rows: list[int], batch: int = 8) -> float:
    """Teacher-forced top-1 agreement: the drafter's greedy token (over its kept vocabulary) equals the target's
    greedy token, at every position but the first, on ``rows``: the acceptance of a 1-token greedy draft."""
    was = drafter.training
    drafter.eval()
    dtype = next(drafter.parameters()).dtype
    hit = total = 0
    for i in range(0, len(rows), batch):
        b = data.batch(rows[i:i + batch], dtype)
        logits, _ = drafter(b["x"], shift_features(b["h"]))
        pred = drafter.kept_ids[logits.argmax(-1)]
        m = b["mask"]
        hit += int((pred[m] == b["argmax"][m]).sum())
        total += int(m.sum())
    drafter.train(was)
    return hit / max(total, 1)


def _lr_factor(progress: float, warmup: float = 0.02) -> float:
    """Linear warm-up, then cosine down to a tenth (the run's length is in seconds, so progress is time)."""
    if progress < warmup:
        return max(progress / warmup, 0.05)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def train(plan: PretrainPlan, drafter, data: WindowSet, train_rows: list[int], held_rows: list[int],
          held_sources: dict[str, list[int]]) -> dict:
    from tqdm import tqdm

    drafter.requires_grad_(False)
    for name, p in drafter.named_parameters():  # the head and the embedding are the target's: frozen
        p.requires_grad_(not name.startswith(("head.", "body.embed_tokens")))
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    state_path = plan.out / STATE
    st = {"step": 0, "train_s": 0.0, "tokens": 0, "curve": []}
    if state_path.is_file():
        saved = torch.load(state_path)
        drafter.load_state_dict(saved["drafter"], strict=False)
        opt.load_state_dict(saved["opt"])
        st = saved["stats"]
        _say(f"resuming at step {st['step']} ({st['train_s']:.0f} s trained)")

    def evaluate() -> dict:
        point = {"train_s": round(st["train_s"], 1), "step": st["step"],
                 "top1": round(top1_agreement(drafter, data, held_rows), 4)}
        point.update({f"top1_{k}": round(top1_agreement(drafter, data, rows), 4) for k, rows in held_sources.items()})
        st["curve"].append(point)
        _say(f"held-out top-1 agreement: {point}")
        return point

    def save() -> None:
        torch.save({"drafter": drafter.own_state_dict(), "opt": opt.state_dict(), "stats": st},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    budget = plan.minutes * 60
    if not st["curve"]:
        evaluate()
    rng = random.Random(plan.seed + st["step"])
    dtype = next(drafter.parameters()).dtype
    drafter.train()
    bar = tqdm(total=round(budget), initial=min(round(st["train_s"]), round(budget)), desc="training (s)",
               unit="s", file=sys.stderr)
    last_save = last_eval = time.monotonic()
    order: list[int] = []
    while st["train_s"] < budget:
        t0 = time.perf_counter()
        if len(order) < plan.batch:
            order += rng.sample(train_rows, len(train_rows))
        rows, order = order[:plan.batch], order[plan.batch:]
        for g in opt.param_groups:
            g["lr"] = plan.lr * _lr_factor(st["train_s"] / budget)
        loss = pretrain_loss(drafter, data.batch(rows, dtype), plan.feature_loss_weight, plan.feature_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        spent = time.perf_counter() - t0
        st["step"] += 1
        st["train_s"] += spent
        st["tokens"] += data.tokens(rows)
        st["loss"] = round(float(loss.detach()), 5)
        bar.update(min(round(st["train_s"]) - bar.n, round(budget) - bar.n))
        bar.set_postfix(step=st["step"], loss=st["loss"])
        now = time.monotonic()
        if now - last_eval >= plan.eval_every_s:
            evaluate()
            last_eval = time.monotonic()
        if now - last_save >= 60:
            save()
            last_save = now
    bar.close()
    if st["curve"][-1]["step"] != st["step"]:
        evaluate()
    save()
    drafter.eval()
    return st


def target_fingerprint(target) -> str:
    """A short hash of weights that identify the target (its final norm and first embedding rows): a shipped
    drafter is used only over the target it was trained against."""
    import hashlib

    w = torch.cat([target.model.norm.weight.detach().float().flatten(),
                   target.get_input_embeddings().weight[:16].detach().float().flatten()])
    return hashlib.sha256(w.cpu().numpy().round(4).tobytes()).hexdigest()[:16]


def target_signature(target) -> list[float]:
    """32 fixed random projections of the same weights as target_fingerprint: unlike the hash, they survive a
    change of precision (bf16 weights move them by ~0.4%, another model by ~100%), so a drafter distilled from
    the fp32 target is still recognised over the same target served in bf16."""
    w = torch.cat([target.model.norm.weight.detach().float().flatten(),
                   target.get_input_embeddings().weight[:16].detach().float().flatten()]).cpu()
    proj = torch.randn(32, w.numel(), generator=torch.Generator().manual_seed(0))
    return [round(x, 6) for x in (proj @ w / w.numel() ** 0.5).tolist()]


def same_target(manifest: dict, target) -> bool:
    """Whether a checkpoint's manifest names this target: its fingerprint, or its signature within 2%."""
    if manifest.get("target_fingerprint") == target_fingerprint(target):
        return True
    sig = manifest.get("target_signature")
    if not sig:
        return False
    a, b = torch.tensor(target_signature(target)), torch.tensor(sig)
    return bool((a - b).norm() <= 0.02 * b.norm())


def pretrain(plan: PretrainPlan, target, tokenizer, drafter, version: str = "base-feature-pretrained",
             ship: bool = True, always_keep: tuple[int, ...] = (), init: str | None = None) -> dict:
    """All three stages, then the checkpoint in ``plan.out`` (fp16, head shared when ``ship``); returns the
    manifest. With ``plan.vocab_from_corpus`` the drafter's kept vocabulary is re-chosen from the corpus's
    answers (``always_keep`` first) before the teacher scores anything; ``init`` names the checkpoint the
    drafter's weights were started from (recorded in the manifest)."""
    from onspec.actors.checkpoint import save_checkpoint
    from onspec.actors.int4_linear import use_bulk_matmuls
    from onspec.kernels.vocab_trim import select_kept_ids

    plan.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # The answers are only text to score, so they are written with the faster bulk matmuls; the teacher that
    # labels them runs at the served precision (what the drafter will be verified against).
    use_bulk_matmuls(target, plan.bulk_rows)
    try:
        corpus = build_corpus(plan, target, tokenizer)
    finally:
        use_bulk_matmuls(target, 0)
    if not corpus:
        raise ValueError("the pretraining corpus is empty: give --tokens or --local-tokens above 0")
    coverage = None
    if plan.vocab_from_corpus and any(c["source"] == "answer" for c in corpus):
        counts = answer_token_counts(corpus, target.config.vocab_size)
        keep_vocabulary(drafter, target, select_kept_ids(counts, drafter.kept_ids.numel(), always_keep))
        coverage = round(float(counts[drafter.kept_ids].sum() / counts.sum().clamp_min(1)), 4)
        _say(f"kept vocabulary from the corpus: {coverage:.1%} of answer tokens covered")
    data_s = time.time() - t0
    wins = corpus_windows(corpus, plan.window)
    t1 = time.time()
    data = WindowSet(build_teacher(plan, target, drafter.kept_ids, [w for _, w in wins]))
    teacher_s = time.time() - t1
    held = lambda s: zlib.crc32(str(s).encode()) % 20 == 0  # noqa: E731  a sequence-level split
    train_rows = [i for i, (s, _) in enumerate(wins) if not held(s)]
    held_rows = [i for i, (s, _) in enumerate(wins) if held(s)][:400]
    if not train_rows or not held_rows:  # tiny corpora (tests): hold out the last window
        train_rows, held_rows = list(range(max(len(wins) - 1, 1))), [len(wins) - 1]
    by_source = {src: [i for i in held_rows if corpus[wins[i][0]]["source"] == src] for src in ("answer", "local")}
    st = train(plan, drafter, data, train_rows, held_rows, {k: v for k, v in by_source.items() if v})
    answers = [c for c in corpus if c["source"] == "answer"]
    report = {
        "method": "dense forward-KL + feature regression on target-scored windows (actors/pretrain.py)",
        "corpus": {"answers": len(answers), "answer_tokens": sum(len(c["ids"]) - c["prompt_len"] for c in answers),
                   "local_windows": sum(c["source"] == "local" for c in corpus),
                   "local_tokens": sum(len(c["ids"]) for c in corpus if c["source"] == "local"),
                   "windows": len(wins), "tokens": int(data.length.sum()), "held_out_windows": len(held_rows),
                   "prompt_set": ("target-written requests continuing lists of actors/pretrain_prompts.py's, and "
                                  "standard-library docstring code tasks, in turn"
                                  if plan.written_requests > 0 else
                                  f"actors/pretrain_prompts.py with {plan.docstring_share:.0%} standard-library "
                                  "docstring code tasks" if plan.docstring_share > 0 else "actors/pretrain_prompts.py"),
                   "local_text": "Python standard library",
                   "kept_vocabulary": ("answer token counts" if coverage is not None
                                      else "the starting drafter's" if init else "token_counts.json"),
                   "answer_tokens_in_kept_vocabulary": coverage},
        "init": init,
        "steps": st["step"], "train_s": round(st["train_s"], 1), "tokens_trained": st["tokens"],
        "final_loss": st.get("loss"), "held_out_top1": st["curve"][-1], "curve": st["curve"],
        "data_s": round(data_s, 1), "teacher_s": round(teacher_s, 1),
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
    }
    return save_checkpoint(drafter, plan.out, version, parent=None, dtype=torch.float16 if ship else None,
                           shared_head=ship, extra={"pretraining": report,
                                                    "target_fingerprint": target_fingerprint(target),
                                                    "target_signature": target_signature(target)})
