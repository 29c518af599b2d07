"""model.dtype int4: the target's decoder linears on the GGUF file's own Q4_1 blocks (actors/int4_linear.py)."""
import numpy as np
import pytest
import torch

from onspec.actors.config import OnspecConfig
from onspec.actors.int4_linear import GROUP, FusedInt4, Int4Linear, Q8Head, q4_1_codes, use_bulk_matmuls
from onspec.actors.requests import SamplingParams
from tests.conftest import DATA_DIR


def test_q4_1_blocks_decode_as_ggml_does():
    """One hand-made block: d = 0.5, m = -1, byte j = (code j) | (code j + 16) << 4."""
    codes = np.arange(32) % 16
    block = np.concatenate([np.array([0.5, -1.0], dtype=np.float16).view(np.uint8),
                            (codes[:16] | (codes[16:] << 4)).astype(np.uint8)])
    q, d, m = q4_1_codes(np.tile(block, (16, 1)), GROUP)  # the kernel packs 16 rows at a time
    assert q[0].tolist() == codes.tolist() and d[0].item() == 0.5 and m[0].item() == -1.0
    lin = Int4Linear(q, d, m)
    assert torch.equal(lin.dequantized()[0], torch.tensor(0.5 * codes - 1.0, dtype=torch.float32))


def test_int4_rows_do_not_depend_on_their_neighbours():
    """What keeps speculation identical at this precision: a k-token verification computes each position as a
    single step would."""
    g = torch.Generator().manual_seed(0)
    lin = Int4Linear(torch.randint(0, 16, (64, 96), generator=g), torch.rand(64, 3, generator=g) / 10,
                     -torch.rand(64, 3, generator=g) / 10)
    x = torch.randn(7, 96, generator=g)
    full = lin(x)
    assert all(torch.equal(full[i:i + 1], lin(x[i:i + 1])) for i in range(7))
    ref = x @ lin.dequantized().t()
    assert (full - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 inside the matmul


def test_bulk_matmuls_serve_only_calls_with_many_rows_and_switch_back_off():
    """use_bulk_matmuls (pretraining's answers): from min_rows rows a call is a bf16 matmul over the dequantized
    weights, close to the kernel's; below it, and after switching off, the kernel's own bits."""
    g = torch.Generator().manual_seed(3)
    lin = Int4Linear(torch.randint(0, 16, (64, 96), generator=g), torch.rand(64, 3, generator=g) / 10,
                     -torch.rand(64, 3, generator=g) / 10)
    q, d = torch.randint(-128, 128, (32, 64), generator=g), torch.rand(32, 2, generator=g) / 50
    head = Q8Head(q, d, (d.repeat_interleave(GROUP, dim=1) * q).float())
    model = torch.nn.ModuleList([lin, head])
    few, many = torch.randn(3, 96, generator=g), torch.randn(40, 96, generator=g)
    hx = torch.randn(40, 64, generator=g)
    before = [lin(few), lin(many), head(hx[:3]), head(hx)]
    assert use_bulk_matmuls(model, 16) == 2
    assert lin.bulk.dtype == torch.bfloat16 and lin.bulk.shape == (64, 96)
    assert torch.equal(lin(few), before[0]) and torch.equal(head(hx[:3]), before[2])  # under 16 rows: the kernel
    bulk = lin(many)
    assert not torch.equal(bulk, before[1])  # another kernel, rounded otherwise ...
    ref = many @ lin.dequantized().t()
    assert (bulk - ref).abs().max() < 0.02 * ref.abs().max()  # ... over the same weights
    hb = head(hx)
    assert hb.dtype == before[3].dtype and (hb.float() - before[3].float()).abs().max() < 0.02 * before[3].abs().max()
    use_bulk_matmuls(model, 0)
    assert lin.bulk is None and head.bulk is None
    assert torch.equal(lin(many), before[1]) and torch.equal(head(hx), before[3])


def test_fused_projections_give_each_part_bitwise():
    """q, k, v (and gate, up) as one matmul: each part's columns are what its own module computes, and the parts
    still serve alone from views of the fused codes."""
    g = torch.Generator().manual_seed(1)
    parts = [Int4Linear(torch.randint(0, 16, (n, 64), generator=g), torch.rand(n, 2, generator=g) / 10,
                        -torch.rand(n, 2, generator=g) / 10) for n in (64, 16, 48)]
    x = torch.randn(5, 64, generator=g)
    alone = [p(x) for p in parts]
    fused = FusedInt4(parts)
    assert parts[0].packed.data_ptr() == fused.packed.data_ptr()  # a view where the packing lines up
    assert torch.equal(fused(x), torch.cat(alone, dim=-1))
    assert all(torch.equal(p(x), a) for p, a in zip(parts, alone))


def test_q8_head_is_the_blocks_int8_codes_on_the_4bit_kernel():
    """q = 16 hi + lo: with power-of-two scales every product is exact in bf16, so one-hot inputs read back the
    weights d * q exactly, for every int8 code."""
    g = torch.Generator().manual_seed(2)
    n, k = 256, 64
    q = torch.arange(-128, 128).repeat(n * k // 256).view(n, k)[torch.randperm(n, generator=g)]
    d = 2.0 ** -torch.randint(2, 9, (n, k // GROUP), generator=g).float()
    head = Q8Head(q, d, torch.zeros(n, k))
    w = (d.repeat_interleave(GROUP, dim=1) * q).float()
    assert torch.equal(head(torch.eye(k)), w.t())
    x = torch.randn(3, k, generator=g)
    assert (head(x) - x @ w.t()).abs().max() < 0.02 * (x @ w.t()).abs().max()  # bf16 inside


def test_int4_from_float_rounds_each_block_to_its_own_grid():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    lin = Int4Linear.from_float(w, b)
    blocks = w.view(32, 2, GROUP)
    step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    err = (lin.dequantized() - w).abs().view(32, 2, GROUP)
    assert (err <= step[..., None] / 2 * 1.01 + 1e-3).all()  # half a step (d and m are kept in fp16)
    x = torch.randn(3, 64, generator=g)
    ref = x @ lin.dequantized().t() + b
    assert (lin(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_int8_from_float_keeps_a_step_of_max_over_127_and_runs_fused_and_planned():
    """8-bit blocks (the served drafter's, drafter.dtype int8) on the 4-bit kernel: each weight within half a step
    of max |w| / 127 of its block, fused projections bitwise their parts, and a decoder layer's plan bitwise its
    modules."""
    from transformers import LlamaConfig, LlamaModel

    from onspec.actors.int4_linear import int4_copy
    from onspec.actors.row_cache import RowCache, body_forward

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    lin = Int4Linear.from_float(w, b, bits=8)
    step = w.view(32, 2, GROUP).abs().amax(-1) / 127
    err = (lin.dequantized() - w).abs().view(32, 2, GROUP)
    assert lin.repeat == 2 and (err <= step[..., None] * 0.55).all()  # half a step, and fp16 scales
    assert err.max() < 0.1 * (Int4Linear.from_float(w).dequantized() - w).abs().max()  # finer than 4 bits
    x = torch.randn(3, 64, generator=g)
    ref = x @ lin.dequantized().t() + b
    assert (lin(x) - ref).abs().max() < 0.02 * ref.abs().max()
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    body = int4_copy(LlamaModel(cfg).eval(), bits=8)
    layer = body.layers[0]
    qkv = torch.cat([m(x) for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)], -1)
    assert torch.equal(layer.self_attn.qkv(x), qkv)
    ids = torch.randint(0, 64, (1, 6), generator=g)
    with torch.inference_mode():
        out = {}
        for path in ("plan", "modules"):
            for layer in body.layers:
                layer.__dict__["_int4_plan"] = False if path == "plan" else None  # None: the modules' path
            cache = RowCache(body, 1, 16)
            out[path] = body_forward(body, body.embed_tokens(ids), cache, 0, torch.tensor([0]))
            if path == "plan":
                assert body.layers[0].__dict__["_int4_plan"].repeat == 2  # the plan ran, over 8-bit blocks
        assert torch.equal(out["plan"], out["modules"])


@pytest.fixture(scope="module")
def int4_engine():
    from onspec.actors.engine import SpeculativeEngine

    return SpeculativeEngine.from_config(OnspecConfig(data_dir=DATA_DIR).merged(**{"model.dtype": "int4"}))


@pytest.mark.real_model
def test_int4_serves_exactly_the_files_weights(int4_engine):
    from onspec.actors.models import load_target

    lins = [m for m in int4_engine.target.modules() if isinstance(m, Int4Linear)]
    assert len(lins) == 7 * int4_engine.target.config.num_hidden_layers
    head = int4_engine.target.lm_head
    assert isinstance(head, Q8Head) and head.weight is int4_engine.target.model.embed_tokens.weight
    cfg = OnspecConfig(data_dir=DATA_DIR).merged(**{"model.dtype": "float32"})
    fp32, _ = load_target(cfg.model, cfg.data_dir)  # transformers' own dequantisation of the GGUF
    ref = dict(fp32.named_modules())
    for name, m in int4_engine.target.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(m.dequantized(), ref[name].weight.float()), name


@pytest.mark.real_model
def test_the_drafter_follows_the_4bit_target(int4_engine):
    """Served in 8-bit blocks on the 4-bit kernel beside a 4-bit target (drafter.dtype auto), sharing its
    embedding; the drafter handed in stays as it was (the trainer's and the registry's copy)."""
    from onspec.actors.config import DrafterConfig
    from onspec.actors.int4_linear import FusedInt4
    from onspec.actors.models import make_drafter

    def linears(m):
        return sum(isinstance(x, torch.nn.Linear) for x in m.modules())

    served = int4_engine.drafter
    assert served.served_int4 and linears(served) == 0
    assert {m.repeat for m in served.modules() if isinstance(m, Int4Linear)} == {2}
    assert any(isinstance(m, FusedInt4) for m in served.modules())
    assert served.body.embed_tokens.weight is int4_engine.target.model.embed_tokens.weight
    assert int4_engine.for_serving(served) is served  # already served: not copied again
    handed = make_drafter(int4_engine.target, DrafterConfig(base="derived"))
    before = linears(handed)
    assert linears(int4_engine.for_serving(handed)) == 0 and linears(handed) == before > 0
    # a served copy saves (registers) as the float drafter it stands for
    assert set(served.own_state_dict()) == set(handed.own_state_dict())


@pytest.mark.real_model
def test_int4_speculation_equals_int4_target_alone(int4_engine, real_engine):
    for prompt in ("def quicksort(items):", "Write a haiku about the sea."):
        ids = int4_engine.encode(messages=[{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=40, temperature=0.0)
        spec = int4_engine.generate(ids, params, speculate=True)
        assert spec.token_ids == int4_engine.generate(ids, params, speculate=False).token_ids
        assert spec.stats.drafted > 0


@pytest.mark.real_model
def test_int4_requests_in_a_batch_get_what_they_get_alone(int4_engine):
    prompts = ["def is_prime(n):", "List three colours.", "class Stack:"]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    ids = [int4_engine.encode(messages=[{"role": "user", "content": p}]) for p in prompts]
    solo = [int4_engine.generate(i, params, speculate=False).token_ids for i in ids]
    seqs = [int4_engine.submit(i, params) for i in ids]
    out = {id(s): [] for s in seqs}
    while int4_engine.busy:
        for s in int4_engine.step():
            out[id(s)] += s.new
    assert [out[id(s)] for s in seqs] == solo
