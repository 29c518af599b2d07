"""`onspec drafter pretrain` on tiny data with the real target, and the base drafter shipped in the repository:
it is what a fresh clone serves, its weights are hash-checked, it keeps outputs identical to the target alone, and
it is accepted often enough on the packaged prompts to be worth drafting with."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from onspec.actors.checkpoint import CheckpointError, load_checkpoint, read_manifest
from onspec.actors.feature_drafter import derive_feature_drafter
from onspec.actors.models import (PACKAGED_BASE, initial_version, make_drafter, packaged_base_drafter,
                                  stop_token_ids)
from onspec.actors.pretrain import PretrainPlan, pretrain, target_fingerprint
from onspec.actors.pretrain_prompts import pretrain_prompts
from onspec.actors.config import DrafterConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "actors" / "data" / PACKAGED_BASE

pytestmark = pytest.mark.real_model


def test_prompt_set_is_broad_and_never_holds_a_benchmark_prompt():
    prompts = [p[0]["content"] for p in pretrain_prompts()]
    assert len(prompts) == len(set(prompts)) > 2000
    first = prompts[:200]  # a short run still gets both kinds of text
    assert sum(p.startswith(("Write a", "How do I", "Explain", "What does this code")) for p in first) > 60
    held_out = {json.loads(line)["messages"][0]["content"]
                for f in (REPO / "bench" / "phases").glob("*.jsonl") for line in f.read_text().splitlines()}
    assert held_out and not held_out & set(prompts)


@pytest.fixture(scope="module")
def tiny_run(real_engine, tmp_path_factory):
    """A pretraining run on a few hundred tokens, then the same folder again with more minutes (a resume)."""
    target, tok = real_engine.target, real_engine.tokenizer
    out = tmp_path_factory.mktemp("pretrain")
    plan = PretrainPlan(out=out, minutes=0.1, tokens=48, local_tokens=600, window=96, max_new_tokens=24,
                        gen_batch=3, batch=4, eval_every_s=1e9)
    drafter = derive_feature_drafter(target, 1, 8192, always_keep=tuple(sorted(stop_token_ids(target, tok))))
    first = pretrain(plan, target, tok, drafter)
    lines = (out / "corpus.jsonl").read_text().count("\n")
    plan.minutes = first["pretraining"]["train_s"] / 60 + 0.05  # more than the first run trained: it goes on
    again = derive_feature_drafter(target, 1, 8192, always_keep=tuple(sorted(stop_token_ids(target, tok))))
    second = pretrain(plan, target, tok, again)
    return out, first, second, lines


def test_pretraining_records_its_corpus_steps_and_held_out_figure(tiny_run):
    out, first, _, _ = tiny_run
    p = first["pretraining"]
    assert p["corpus"]["answers"] >= 1 and p["corpus"]["answer_tokens"] >= 48
    assert p["corpus"]["local_tokens"] >= 500 and p["corpus"]["held_out_windows"] >= 1
    assert p["steps"] >= 1 and p["tokens_trained"] > 0
    curve = p["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == p["steps"] and 0 <= curve[-1]["top1"] <= 1
    assert first["config"]["kind"] == "feature" and first["config"]["head"] == "target"


def test_pretraining_resumes_from_its_folder(tiny_run):
    out, first, second, lines = tiny_run
    assert (out / "corpus.jsonl").read_text().count("\n") == lines  # the corpus was not made again
    assert second["pretraining"]["steps"] > first["pretraining"]["steps"]
    assert second["pretraining"]["curve"][0] == first["pretraining"]["curve"][0]  # one run, continued


def test_a_pretrained_checkpoint_is_fp16_and_shares_the_targets_head(tiny_run, real_engine):
    from safetensors.torch import load_file

    out, _, _, _ = tiny_run
    state = load_file(out / "drafter.safetensors")
    assert "head.weight" not in state and state["fc.weight"].dtype == torch.float16
    drafter, _ = load_checkpoint(out, real_engine.target)
    rows = real_engine.target.get_output_embeddings().weight[drafter.kept_ids]
    assert torch.equal(drafter.head.weight, rows)


def test_the_shipped_base_drafter_is_small_and_what_a_fresh_clone_serves(real_engine):
    assert (SHIPPED / "manifest.json").is_file(), "actors/data/base_drafter is not in the repository"
    weights = SHIPPED / "drafter.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    manifest = read_manifest(SHIPPED)
    assert manifest["target_fingerprint"] == target_fingerprint(real_engine.target)
    base = make_drafter(real_engine.target, DrafterConfig())
    assert base.kind == "feature" and base.version == manifest["version"] == initial_version(DrafterConfig())
    assert initial_version(DrafterConfig(base="derived")) == "base-feature"
    derived = make_drafter(real_engine.target, DrafterConfig(base="derived"))
    assert derived.version == "base-feature"
    assert make_drafter(real_engine.target, DrafterConfig(kind="truncated")).version == "base"  # another kind


def test_a_tampered_shipped_drafter_is_refused(real_engine, tmp_path, monkeypatch):
    import onspec.actors.models as models

    bad = tmp_path / "data" / PACKAGED_BASE
    shutil.copytree(SHIPPED, bad)
    raw = bytearray((bad / "drafter.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "drafter.safetensors").write_bytes(bytes(raw))
    monkeypatch.setattr(models.resources, "files", lambda pkg: tmp_path)
    with pytest.raises(CheckpointError, match="sha256"):
        packaged_base_drafter(real_engine.target, DrafterConfig())


def test_the_shipped_base_drafter_keeps_outputs_identical_and_is_accepted(real_engine):
    """Greedy, drafting one token a round from the model alone on the packaged prompts: identical to the target
    alone, and its first-token acceptance clears a floor well under what BENCHMARKS.md measures on unseen
    prompts (0.2 here against 0.5+: the floor catches a broken base, not noise)."""
    from onspec.actors.requests import SamplingParams
    from onspec.actors.prompts import packaged_prompts, read_prompts

    eng = real_engine
    base = make_drafter(eng.target, DrafterConfig())
    old_drafter, old_spec = eng.drafter, eng.spec
    eng.set_drafter(base)
    eng.spec = eng.controller.cfg = old_spec.model_copy(update={"mode": "fixed", "fixed_k": 1, "source": "model"})
    try:
        drafted = accepted = 0
        for spec in read_prompts(packaged_prompts("default_prompts.jsonl"))[:4]:
            ids = eng.encode(spec.prompt, spec.messages)
            ref = eng.generate(ids, SamplingParams(max_tokens=32), speculate=False).token_ids
            g = eng.generate(ids, SamplingParams(max_tokens=32))
            assert g.token_ids == ref
            drafted, accepted = drafted + g.stats.drafted, accepted + g.stats.accepted
    finally:
        eng.spec = eng.controller.cfg = old_spec
        eng.set_drafter(old_drafter)
    assert drafted > 0 and accepted / drafted >= 0.2
