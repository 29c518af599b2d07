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
    from onspec.actors import pretrain_prompts as pp

    convs = pretrain_prompts()
    prompts = [p[-1]["content"] for p in convs]
    assert len(prompts) == len(set(prompts)) > 4000
    assert all(p[-1]["role"] == "user" for p in convs)
    with_system = [p for p in convs if p[0]["role"] == "system"]
    assert 0.05 < len(with_system) / len(convs) < 0.2  # as many clients send one
    # A short run still gets every family: the first 400 prompts hold a recipe, a trip, an email, a poem, a
    # number problem, a bug to find, an SQL query and a Python function.
    first = prompts[:400]
    for family in (pp.DISHES, pp.PLACES + pp.TRIPS, [w for w, _ in pp.LETTERS], pp.POEM_SUBJECTS, pp.BUGGY,
                   pp.SQL_TASKS, pp.CODE_TASKS):
        assert any(any(x in p for x in family) for p in first), family[:2]
    assert any(p.startswith(("If ", "What is ", "Solve for x")) and any(c.isdigit() for c in p) for p in first)
    held_out = {json.loads(line)["messages"][-1]["content"]
                for f in (REPO / "bench" / "phases").glob("*.jsonl") for line in f.read_text().splitlines()}
    assert held_out and not held_out & set(prompts)
    assert pretrain_prompts(50) == convs[:50] == pretrain_prompts(50, seed=0)  # seeded, a prefix of the whole


def test_listed_requests_are_read_from_a_continued_list():
    from onspec.actors.pretrain_sources import parse_listed_requests

    text = (" How do I keep basil alive indoors?\n5. Write a Go function that reverses a slice.\n6) Fix it.\n"
            "Some closing remark that is not an item.\n7. Write a poem about the sea\n8. How do I")
    got = parse_listed_requests(text, examples=["Write a poem about the sea"])
    # the open item, then numbered ones; too short ("Fix it.", the cut-off last one), unnumbered or repeating an
    # example are left out
    assert got == ["How do I keep basil alive indoors?", "Write a Go function that reverses a slice."]


def test_the_target_writes_requests_in_its_own_words_and_a_rerun_reuses_them(real_engine, tmp_path):
    from onspec.actors.pretrain_sources import REQUESTS, write_requests

    plan = PretrainPlan(out=tmp_path, written_requests=6, gen_batch=2)
    got = write_requests(plan, real_engine.target, real_engine.tokenizer)
    templates = {p[-1]["content"].lower() for p in pretrain_prompts()}
    assert len(got) == 6 == len({g.lower() for g in got})
    assert not templates & {g.lower() for g in got}  # new wording, not the examples copied
    saved = (tmp_path / REQUESTS).read_text()
    assert [json.loads(x)["content"] for x in saved.splitlines()] == got
    assert write_requests(plan, real_engine.target, real_engine.tokenizer) == got  # made once
    assert (tmp_path / REQUESTS).read_text() == saved


def test_code_tasks_come_from_the_standard_librarys_docstrings():
    from onspec.actors.pretrain_sources import docstring_tasks

    tasks = docstring_tasks(seed=0)
    assert len(tasks) == len(set(tasks)) > 500 and tasks == docstring_tasks(seed=0)
    assert any("Test whether a path exists." in t for t in tasks)  # os.path.exists's own words
    held_out = {json.loads(line)["messages"][-1]["content"]
                for f in (REPO / "bench" / "phases").glob("*.jsonl") for line in f.read_text().splitlines()}
    assert not held_out & set(tasks)


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


def test_the_answers_are_written_with_bulk_matmuls_and_the_teacher_is_served_precision(tiny_run, real_engine):
    """The target is left as it serves: no module keeps its bulk weights after pretraining (a shared engine would
    otherwise prefill long prompts off the 4-bit kernel)."""
    from onspec.actors.int4_linear import Int4Linear

    p = tiny_run[1]["pretraining"]
    assert p["plan"]["bulk_rows"] == 32
    lins = [m for m in real_engine.target.modules() if isinstance(m, Int4Linear)]
    assert lins and all(m.bulk is None for m in lins)


def test_templates_and_docstring_tasks_mix_at_the_asked_share():
    from onspec.actors.pretrain_sources import mixed_prompts

    templates = [[{"role": "user", "content": f"t{i}"}] for i in range(90)]
    out = mixed_prompts(templates, [f"d{i}" for i in range(100)], 0.25)
    texts = [m[-1]["content"] for m in out]
    assert [t for t in texts if t[0] == "t"] == [f"t{i}" for i in range(90)]  # every template, in order
    tasks = [t for t in texts if t[0] == "d"]
    assert tasks == [f"d{i}" for i in range(len(tasks))] and len(tasks) == 30  # 30 / 120 = 25%
    assert all(texts[i][0] == "t" or texts[i - 1][0] == "t" for i in range(1, len(texts)))  # spread, not bunched
    assert len(mixed_prompts(templates, ["d0"], 0.5)) == 91  # tasks that run out leave the templates
    with pytest.raises(ValueError):
        mixed_prompts(templates, [], 1.0)


def test_pretraining_resumes_from_its_folder(tiny_run):
    out, first, second, lines = tiny_run
    assert (out / "corpus.jsonl").read_text().count("\n") == lines  # the corpus was not made again
    assert second["pretraining"]["steps"] > first["pretraining"]["steps"]
    assert second["pretraining"]["curve"][0] == first["pretraining"]["curve"][0]  # one run, continued


def test_the_kept_vocabulary_is_chosen_from_the_answers_the_target_wrote(tiny_run, real_engine):
    from onspec.actors.pretrain import answer_token_counts

    out, first, _, _ = tiny_run
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    written = {t for c in corpus if c["source"] == "answer" for t in c["ids"][c["prompt_len"]:]}
    drafter, _ = load_checkpoint(out, real_engine.target)
    kept = set(drafter.kept_ids.tolist())
    assert written <= kept  # a tiny corpus: every token the target wrote has a row in the head
    packaged = derive_feature_drafter(real_engine.target, 1, 8192)
    assert kept != set(packaged.kept_ids.tolist())  # ... which token_counts.json alone would not have chosen
    assert first["pretraining"]["corpus"]["answer_tokens_in_kept_vocabulary"] == 1.0
    counts = answer_token_counts(corpus, real_engine.target.config.vocab_size)
    assert int(counts.sum()) == first["pretraining"]["corpus"]["answer_tokens"]


def test_pretraining_can_go_on_from_the_shipped_base(tmp_path):
    """`--init shipped` starts from the packaged weights: its first held-out figure is the shipped drafter's,
    far above the derived drafter's start (~0.05); a bad --init is a CLI error naming it."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import DATA_DIR

    cmd = [sys.executable, "-m", "onspec.cluster.cli", "drafter", "pretrain", "--out", str(tmp_path / "a"),
           "--data-dir", str(DATA_DIR), "--tokens", "64", "--local-tokens", "600", "--minutes", "0.02",
           "--gen-batch", "4", "--init", "shipped"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = read_manifest(tmp_path / "a")
    assert manifest["pretraining"]["init"] == "shipped"
    assert manifest["pretraining"]["curve"][0]["top1"] > 0.3
    assert manifest["pretraining"]["corpus"]["kept_vocabulary"] == "answer token counts"
    # --keep-vocabulary: the shipped drafter's kept ids stay (so teacher shards scored for them stay valid)
    kept = subprocess.run(cmd[:6] + [str(tmp_path / "c")] + cmd[7:] + ["--keep-vocabulary"],
                          capture_output=True, text=True, timeout=600)
    assert kept.returncode == 0, kept.stderr[-2000:]
    ids = lambda d: load_file(d / "drafter.safetensors")["kept_ids"]  # noqa: E731
    assert torch.equal(ids(tmp_path / "c"), ids(SHIPPED))
    assert read_manifest(tmp_path / "c")["pretraining"]["corpus"]["kept_vocabulary"] == "the starting drafter's"
    bad = subprocess.run(cmd[:6] + [str(tmp_path / "b")] + cmd[7:-1] + [str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--init" in bad.stderr and "Traceback" not in bad.stderr


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
