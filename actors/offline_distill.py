"""Offline distillation of a drafter on text the target generates (DistillSpec's recipe, arXiv 2310.08461):
the target writes continuations of a prompt set, then the drafter is trained with forward KL to the target's
distribution at every position of those sequences. Online training (a later issue) reuses the loss."""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch

from onspec.actors.prompts import PromptSpec
from onspec.kernels.losses import sparse_forward_kl


def _encode(tokenizer, spec: PromptSpec) -> list[int]:
    if spec.messages is not None:
        return list(tokenizer.apply_chat_template(spec.messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(spec.prompt, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def generate_corpus(target, tokenizer, specs: list[PromptSpec], max_new_tokens: int = 160, batch_size: int = 8,
                    temperatures: tuple[float, ...] = (0.0, 0.7), seed: int = 0) -> list[dict]:
    """Continuations of every prompt at each temperature: [{"ids": prompt + completion, "prompt_len": n}]."""
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [_encode(tokenizer, s) for s in specs]
    out = []
    for temp in temperatures:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            kw = dict(do_sample=True, temperature=temp, top_p=1.0) if temp > 0 else dict(do_sample=False)
            gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  pad_token_id=pad, **kw)
            for p, row in zip(chunk, gen[:, width:].tolist()):
                if pad in row:  # generation stopped at EOS (pad == EOS here); keep the EOS itself
                    row = row[:row.index(pad) + 1]
                out.append({"ids": p + row, "prompt_len": len(p)})
    return out


def corpus_cached(data_dir: Path, target, tokenizer, specs: list[PromptSpec], max_new_tokens: int) -> list[dict]:
    key = hashlib.sha256(json.dumps([[s.prompt, s.messages] for s in specs] + [max_new_tokens]).encode())
    path = Path(data_dir) / "corpus" / f"{key.hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    corpus = generate_corpus(target, tokenizer, specs, max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(corpus))
    return corpus


def count_generated_tokens(corpus: list[dict], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for seq in corpus:
        gen = torch.tensor(seq["ids"][seq["prompt_len"]:], dtype=torch.long)
        counts += torch.bincount(gen, minlength=vocab_size).double()
    return counts


@torch.inference_mode()
def teacher_targets(target, kept_ids: torch.Tensor, ids: list[int], topk: int = 32, features: bool = False):
    """The target's distribution at every position, restricted to the drafter's kept vocabulary and
    renormalised there (q is zero elsewhere), kept sparse as its top-k: (indices into kept, probs), [T, k].
    ``features``: also the target's last hidden states [T, H] (float16), from the same forward, for a feature
    drafter: (indices, probs, hidden)."""
    if not features:
        logits = target(input_ids=torch.tensor([ids])).logits[0].float()
    else:
        hidden = target.model(input_ids=torch.tensor([ids])).last_hidden_state
        logits = target.lm_head(hidden)[0].float()
    p = torch.softmax(logits[:, kept_ids], dim=-1)
    top = torch.topk(p, topk, dim=-1)
    if features:
        return top.indices, top.values, hidden[0].to(torch.float16)
    return top.indices, top.values


def distill(drafter, target, corpus: list[dict], minutes: float, lr: float = 3e-4, batch_size: int = 4,
            seed: int = 0, log=print, feature_loss_weight: float = 0.1) -> dict:
    """Train the drafter's own parameters (not the shared embedding) with forward KL to the target. A feature
    drafter (EAGLE) is teacher-forced on the target's hidden states, with their smooth-L1 regression added
    (weight ``feature_loss_weight``); its first position (no predecessor's feature) is left out."""
    from onspec.actors.feature_drafter import shift_features

    feature = getattr(drafter, "kind", "truncated") == "feature"
    rng = random.Random(seed)
    t_start = time.time()
    data = []
    for seq in corpus:
        data.append((seq["ids"], *teacher_targets(target, drafter.kept_ids, seq["ids"], features=feature)))
    log(f"teacher targets for {len(data)} sequences in {time.time() - t_start:.0f}s")
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    drafter.train()
    t_start = time.time()  # the training budget starts once the teacher's targets are ready
    deadline = t_start + minutes * 60
    steps, epoch, last = 0, 0, float("nan")
    while time.time() < deadline:
        rng.shuffle(data)
        for i in range(0, len(data), batch_size):
            batch = data[i:i + batch_size]
            width = max(len(b[0]) for b in batch)
            x = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.bool)
            t_idx = torch.zeros(len(batch), width, batch[0][1].shape[1], dtype=torch.long)
            t_prob = torch.zeros(len(batch), width, batch[0][1].shape[1])
            h = torch.zeros(len(batch), width, batch[0][-1].shape[-1]) if feature else None
            for r, (ids, idx, prob, *hid) in enumerate(batch):
                n = len(ids)
                x[r, :n], mask[r, :n] = torch.tensor(ids), True
                t_idx[r, :n], t_prob[r, :n] = idx, prob
                if feature:
                    h[r, :n] = hid[0].float()
            # right padding: causal attention keeps real positions unaffected
            if feature:
                h = h.to(next(drafter.parameters()).dtype)
                logits, predicted = drafter(x, shift_features(h))
                mask[:, 0] = False
                loss = sparse_forward_kl(logits[mask], t_idx[mask], t_prob[mask]) + feature_loss_weight * \
                    torch.nn.functional.smooth_l1_loss(predicted[mask].float(), h[mask].float())
            else:
                logits = drafter(x)
                loss = sparse_forward_kl(logits[mask], t_idx[mask], t_prob[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps, last = steps + 1, float(loss.detach())
            if time.time() >= deadline:
                break
        epoch += 1
        log(f"epoch {epoch} steps {steps} loss {last:.4f} ({time.time() - t_start:.0f}s)")
    drafter.eval()
    return {"steps": steps, "epochs": epoch, "final_loss": last, "seconds": round(time.time() - t_start, 1),
            "sequences": len(corpus), "tokens": sum(len(s["ids"]) for s in corpus)}
