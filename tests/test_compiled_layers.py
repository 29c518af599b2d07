"""model.compiled_layers: the 4-bit target's layers compiled ahead of time (actors/compiled_layers.py)."""
import logging
import time

import pytest
import torch

from onspec.actors.compiled_layers import compile_layers, graph_names, shape_of
from onspec.actors.config import ModelConfig
from onspec.actors.models import load_target
from onspec.actors.row_cache import RowCache, _int4_plan, body_forward
from tests.conftest import DATA_DIR


@pytest.fixture(scope="module")
def compiled_target():
    target, _ = load_target(ModelConfig(), DATA_DIR)
    return target


def test_the_default_target_serves_compiled_layers(compiled_target, real_engine):
    assert compiled_target.model.compiled_layers is not None
    assert real_engine.target.model.compiled_layers is not None  # what the engine tests decode with


@torch.inference_mode()
def test_a_verification_is_bitwise_its_single_steps(compiled_target):
    """Ragged rows with prompts in chunks, then a verification over all rows at once (from a slice of the
    embeddings: a strided view, which the generated code must not misread), against each row alone, one token
    a step: what keeps speculative output identical to target-only decoding."""
    body = compiled_target.model
    g = torch.Generator().manual_seed(3)
    prompts = [40, 23, 9]
    ids = torch.randint(body.config.vocab_size, (3, 60), generator=g)
    emb = body.embed_tokens(ids)
    batch = RowCache(body, 3, 32)
    for r, n in enumerate(prompts):
        body_forward(body, emb[r:r + 1, :n], batch, r, torch.tensor([0]), prompt_chunk=True)
    lengths = torch.tensor(prompts)
    verify = body_forward(body, torch.stack([emb[r, n:n + 4] for r, n in enumerate(prompts)]), batch, 0, lengths)
    for r, n in enumerate(prompts):
        alone = RowCache(body, 1, 32)
        body_forward(body, emb[r:r + 1, :n], alone, 0, torch.tensor([0]), prompt_chunk=True)
        steps = [body_forward(body, emb[r:r + 1, n + t:n + t + 1], alone, 0, torch.tensor([n + t])) for t in range(4)]
        assert torch.equal(verify[r:r + 1], torch.cat(steps, dim=1)), f"row {r}"


@torch.inference_mode()
def test_a_query_gets_the_same_bits_whatever_shares_its_forward(compiled_target):
    """The graphs' own attention (compiled_layers.exact_attention) over random batches: rows of lengths 1-150
    (padded to the longest, so a query's keys end anywhere in a vector), 1-6 queries each, against every query
    computed alone in a cache of another capacity."""
    body = compiled_target.model
    g = torch.Generator().manual_seed(5)
    for trial in range(6):
        b, T = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        lengths = torch.randint(1, 150, (b,), generator=g)
        ids = torch.randint(body.config.vocab_size, (b, 160), generator=g)
        emb = body.embed_tokens(ids)
        batch = RowCache(body, b, 160)
        for r, n in enumerate(lengths.tolist()):
            body_forward(body, emb[r:r + 1, :n], batch, r, torch.tensor([0]), prompt_chunk=True)
        out = body_forward(body, torch.stack([emb[r, n:n + T] for r, n in enumerate(lengths.tolist())]), batch, 0,
                           lengths)
        for r, n in enumerate(lengths.tolist()):
            alone = RowCache(body, 1, 16)
            body_forward(body, emb[r:r + 1, :n], alone, 0, torch.tensor([0]), prompt_chunk=True)
            for t in range(T):
                step = body_forward(body, emb[r:r + 1, n + t:n + t + 1], alone, 0, torch.tensor([n + t]))
                assert torch.equal(out[r, t], step[0, 0]), f"trial {trial}: row {r} of {b}, query {t} of {T}"


@torch.inference_mode()
def test_compiled_layers_compute_the_eager_layers(compiled_target):
    """Not bitwise (silu and the norms round differently), but the same model: logits agree to bf16's
    precision and the greedy tokens match on a prompt."""
    body = compiled_target.model
    ids = torch.randint(body.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(4))
    out = {}
    # A prompt chunk (eager attention between the graphs) and the graphs' own attention (a verification).
    for name, layers, chunk in (("compiled", body.compiled_layers, True), ("attend", body.compiled_layers, False),
                                ("eager", None, True)):
        saved, body.compiled_layers = body.compiled_layers, layers
        try:
            cache = RowCache(body, 1, 64)
            out[name] = compiled_target.lm_head(body_forward(body, body.embed_tokens(ids), cache, 0,
                                                             torch.tensor([0]), prompt_chunk=chunk)).float()
        finally:
            body.compiled_layers = saved
    for name in ("compiled", "attend"):
        assert (out[name] - out["eager"]).abs().max() < 0.05 * out["eager"].abs().max(), name
        assert (out[name].argmax(-1) == out["eager"].argmax(-1)).float().mean() > 0.95, name


def test_a_second_start_loads_the_build(compiled_target):
    """Built once into the data dir (by the fixture's load), loaded in well under a second after that (serve's
    restart budget)."""
    body = compiled_target.model
    import os

    where = DATA_DIR / "compiled"
    builds = sorted(p.name for p in where.iterdir())
    month_ago = time.time() - 31 * 86400
    os.utime(body.compiled_layers.folder, (month_ago, month_ago))
    t = time.perf_counter()
    again = compile_layers(body, where)
    assert again is not None and time.perf_counter() - t < 10
    assert again.folder == body.compiled_layers.folder
    assert sorted(p.name for p in where.iterdir()) == builds  # nothing built twice, no leftovers
    assert again.folder.stat().st_mtime > month_ago + 86400  # the load marked its use (what prune_builds reads)


def test_a_broken_build_leaves_the_eager_layers(compiled_target, tmp_path, caplog):
    body = compiled_target.model
    plans = [_int4_plan(layer) for layer in body.layers]
    names = graph_names(len(plans), chunks=True)
    folder = tmp_path / shape_of(body, plans).key(names)
    folder.mkdir()
    for name in names:
        (folder / f"{name}.pt2").write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="onspec.actors.compiled_layers"):
        assert compile_layers(body, tmp_path) is None
    assert "serving eager layers" in caplog.text


def test_a_float_target_has_no_compiled_layers(tmp_path):
    target, _ = load_target(ModelConfig(dtype="float32"), DATA_DIR)
    assert getattr(target.model, "compiled_layers", None) is None
    target, _ = load_target(ModelConfig(compiled_layers=False), DATA_DIR)
    assert getattr(target.model, "compiled_layers", None) is None


@torch.inference_mode()
def test_the_served_drafter_runs_compiled_layers(real_engine):
    """The drafter's layer on the same graphs (a drafted token 1.6 -> 0.8 ms): its greedy picks agree with its
    eager layer's, and a swapped-in version reuses the loaded graphs (a load per swap would unpack the package
    and map its library again, for as long as the replica serves)."""
    from onspec.actors.config import DrafterConfig
    from onspec.actors.models import make_drafter
    from onspec.actors.row_cache import RowCache

    d = real_engine.drafter
    compiled = d.body.compiled_layers
    assert compiled is not None and not compiled.chunks  # a drafter reads no prompt chunks
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(d.body.embed_tokens.num_embeddings, (1, 40), generator=g)
    feats = torch.randn(1, 40, real_engine.hidden_size, generator=g)
    picks = {}
    for name, layers in (("compiled", compiled), ("eager", None)):
        d.body.compiled_layers = layers
        try:
            cache = RowCache(d.body, 1, 64)
            picks[name] = real_engine._drafter_forward(ids, cache, 0, torch.tensor([0]), feats)[0].argmax(-1)
        finally:
            d.body.compiled_layers = compiled
    assert (picks["compiled"] == picks["eager"]).float().mean() > 0.9
    swapped = real_engine.for_serving(make_drafter(real_engine.target, DrafterConfig()))
    assert swapped.body.compiled_layers.first_attend is compiled.first_attend


def test_builds_unused_for_a_month_are_pruned(tmp_path):
    import os

    from onspec.actors.compiled_layers import prune_builds

    """Each onspec and torch version leaves a build; one no process loaded for 30 days goes (a build that died
    half-way too), one loaded since stays (compile_layers marks a build's use on every load)."""
    old, died, recent, building = (tmp_path / n for n in ("0123456789abcdef", ".build-a", "fedcba9876543210",
                                                             ".build-b"))
    for folder in (old, died, recent, building):
        folder.mkdir()
        (folder / "last.pt2").write_bytes(b"x")
    month_ago = time.time() - 31 * 86400
    for folder in (old, died):
        os.utime(folder, (month_ago, month_ago))
    assert sorted(prune_builds(tmp_path)) == sorted([old.name, died.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, building.name])
