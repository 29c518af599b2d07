"""The 4-bit target's layers compiled ahead of time (AOTInductor): one call a layer, attention included.

At one to a few tokens a step, a 4-bit layer's ~25 eager operations cost more in dispatch than in arithmetic
(BENCHMARKS.md, "A compiled step"). Each layer is one call into graphs that every layer shares, its weights
passed as inputs:

- ``first_attend``: input norm, q/k/v projection, rotary embedding, cache write and attention of layer 0;
- ``mid_attend``: layer i's output projection and MLP, then all of the above for layer i + 1;
- ``last``: the last layer's output projection and MLP (the final norm is one eager op after it).

The graphs write each layer's keys and values into the rows' caches in place, and compute attention each
query over exactly its keys (``exact_attention``), each row on its own: a query's bits do not depend on what
shares its forward, so a verification stays bitwise the single steps it stands for (checked when the layers
load: ``_consistent``). A prompt chunk instead takes ``first`` and ``mid``, the same graphs without attention,
with SDPA's causal kernel between them (``row_cache.body_forward``): the graphs' attention computes every key
of every query, which a long chunk does not need. The graphs are not bitwise the eager layers (their silu and
norms round differently in the last bit), so a process serves one path only, chosen at load: a replica that
falls back to eager stays exact but may part from a compiled replica's greedy text after a near-tie, as two
builds of any engine do.

Rows, tokens, keys and cache capacity are dynamic dimensions, so one build serves decoding, verification,
batches and prompt chunks. Builds are cached in the data dir (``compiled/<key>/``), keyed by torch's version,
the CPU's vector instructions, the layer shape and this file, so a second start loads them in a fraction of a
second. The generated calls run through the package loader directly: its pytree wrapper costs more than a
small graph.

Why not ``torch.compile`` of the whole step: measured slower here (its guards and Python wrapper, and a graph
that mutates the caches copies them); AOTInductor's C++ wrapper has neither.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from onspec.actors.int4_linear import int4_mm, repeated

log = logging.getLogger(__name__)

MAX_ROWS, MAX_TOKENS = 256, 1024  # the largest batch and chunk a build serves (dynamic dimensions)


@dataclass(frozen=True)
class Shape:
    """What the graphs are specialised on: the same for every layer of a body."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    repeat: int

    def key(self, names: tuple[str, ...]) -> str:
        source = Path(__file__).read_bytes()
        # The generated code is for this CPU's vector instructions: a data dir shared by nodes of other CPUs
        # must not load it there.
        cpu = torch.backends.cpu.get_cpu_capability()
        text = f"{torch.__version__}|{cpu}|{self}|{names}|{hashlib.sha256(source).hexdigest()}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _First(torch.nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s

    def qkv(self, h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s):
        """row_cache._layer_int4 up to attention: normed input, q/k/v, q and k rotated, k and v written into the
        rows' caches K, V [b, kv_heads, capacity, head_dim] at positions ``pos`` [b, T] (in place). Returns q
        [b, heads, T, head_dim]."""
        s = self.s
        b, T, H = h.shape
        x = F.rms_norm(h, (H,), in_w, s.eps).view(b * T, H)
        y = int4_mm(repeated(x, s.repeat), qkv_p, qkv_s)
        width = (s.heads + s.kv_heads) * s.head_dim
        qk = y[:, :width].view(b, T, -1, s.head_dim)
        qk = qk * cos + qk.roll(s.head_dim // 2, dims=-1) * sin
        rows = torch.arange(b, device=h.device)[:, None]
        K[rows, :, pos] = qk[:, :, s.heads:]
        V[rows, :, pos] = y[:, width:].view(b, T, -1, s.head_dim)
        return qk[:, :, :s.heads].transpose(1, 2).contiguous()

    def forward(self, h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s):
        return self.qkv(h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s)


def exact_attention(s: Shape, q, K, V, keys, pos):
    """Softmax(q k^T / sqrt(d)) v for every query over the keys at positions <= its own (Vaswani et al. 2017,
    eq. 1; grouped-query: each kv head serves ``heads / kv_heads`` query heads). q [b, heads, T, d]; K, V the
    rows' caches [b, kv_heads, capacity, d]; ``keys`` = arange(span), span the keys any query here sees; ``pos``
    [b, T] each query's position.

    Written as products and sums, not matmuls, so that Inductor generates the loops (a matmul would go to the
    BLAS, whose reduction order depends on the shapes): every sum over keys then runs in key order into one
    vector accumulator, the tail through a masked load, so the masked keys past a query's own add exact zeros
    in lanes of their own and a query gets the same bits whatever it is batched with or padded to. That is what
    speculation rests on (a verification is bitwise its single steps); ``_consistent`` checks it at load."""
    b, _, T, d = q.shape
    g = s.heads // s.kv_heads
    Kk, Vv = K.narrow(2, 0, keys.shape[0]), V.narrow(2, 0, keys.shape[0])
    qg = q.view(b, s.kv_heads, g, T, d) * (1.0 / math.sqrt(d))
    scores = (qg[:, :, :, :, None, :] * Kk[:, :, None, None, :, :]).sum(-1)       # [b, kv_heads, g, T, span]
    seen = keys[None, None, :] <= pos[:, :, None]                                 # [b, T, span]
    scores = scores.masked_fill(~seen[:, None, None], float("-inf"))
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    o = (e[..., None] * Vv[:, :, None, None, :, :]).sum(-2) / e.sum(-1, keepdim=True)
    return o.view(b, s.heads, T, d)


class _FirstAttend(_First):
    def forward(self, h, cos, sin, pos, keys, K, V, in_w, qkv_p, qkv_s):
        q = self.qkv(h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s)
        # q is returned as well so that it is computed once into a buffer: otherwise Inductor inlines its
        # projection's rotation into the attention's loop over keys, once per key (at 200 keys, slower than
        # eager attention).
        return exact_attention(self.s, q, K, V, keys, pos), q


class _Last(_First):
    def mlp(self, h, o, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s):
        """row_cache._layer_int4 after attention: output projection, residual, norm, MLP, residual."""
        s = self.s
        b, T, H = h.shape
        h = h + int4_mm(repeated(o.transpose(1, 2).reshape(b * T, -1), s.repeat), o_p, o_s).view(b, T, H)
        x = F.rms_norm(h, (H,), post_w, s.eps).view(b * T, H)
        gate, up = int4_mm(repeated(x, s.repeat), gu_p, gu_s).chunk(2, dim=-1)
        return h + int4_mm(repeated(F.silu(gate) * up, s.repeat), d_p, d_s).view(b, T, H)

    def forward(self, h, o, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s):
        return self.mlp(h, o, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s)


class _Mid(_Last):
    def forward(self, h, o, cos, sin, pos, K, V, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s, in_w, qkv_p, qkv_s):
        h = self.mlp(h, o, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s)
        return h, self.qkv(h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s)


class _MidAttend(_Last):
    def forward(self, h, o, cos, sin, pos, keys, K, V, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s, in_w, qkv_p, qkv_s):
        h = self.mlp(h, o, o_p, o_s, post_w, gu_p, gu_s, d_p, d_s)
        q = self.qkv(h, cos, sin, pos, K, V, in_w, qkv_p, qkv_s)
        return h, exact_attention(self.s, q, K, V, keys, pos), q  # q: as _FirstAttend's


GRAPHS = {"first": _First, "mid": _Mid, "last": _Last, "first_attend": _FirstAttend, "mid_attend": _MidAttend}


class CompiledLayers:
    """A body's 4-bit layers as the loaded graphs, with each layer's inputs gathered once."""

    def __init__(self, folder: Path, plans, norm_w: torch.Tensor, names: tuple[str, ...]):
        runs = _loaded(folder, names)
        self.folder = folder
        self.first, self.mid, self.last = runs.get("first"), runs.get("mid"), runs["last"]
        self.first_attend, self.mid_attend = runs["first_attend"], runs.get("mid_attend")
        self.chunks = "first" in runs  # a prompt chunk's path (SDPA between attention-free graphs) is built
        self.qkv_w = [[p.in_w, *p.qkv] for p in plans]
        self.mlp_w = [[*p.o, p.post_w, *p.gate_up, *p.down] for p in plans]
        self.norm_w, self.eps = norm_w, plans[0].in_eps

    def forward(self, h, rope, pos, Ks, Vs, attend=None, span: int | None = None):
        """The body over hidden states ``h`` [b, T, H] at positions ``pos`` [b, T] of the rows' caches ``Ks``,
        ``Vs`` (per layer [b, kv_heads, capacity, head_dim], contiguous). Attention is the graphs' own
        (``exact_attention``, each query over its keys ``0 .. pos``, of ``span`` keys in all) or, given
        ``attend(i, q)``, eager: layer i's output [b, heads, T, head_dim] (a prompt chunk's causal product).
        Returns the final-normed hidden states."""
        # The generated code indexes its inputs as the contiguous examples it was built from (it does not read
        # strides): a view such as a slice of the prompt's embeddings must be copied first.
        h, cos, sin, pos = h.contiguous(), rope[0].contiguous(), rope[1].contiguous(), pos.contiguous()
        last = len(self.mlp_w) - 1
        if attend is None:
            keys = torch.arange(span, device=h.device)
            o, _ = self.first_attend([h, cos, sin, pos, keys, Ks[0], Vs[0], *self.qkv_w[0]])
            for i in range(last):
                h, o, _ = self.mid_attend([h, o, cos, sin, pos, keys, Ks[i + 1], Vs[i + 1], *self.mlp_w[i],
                                        *self.qkv_w[i + 1]])
        else:
            q = self.first([h, cos, sin, pos, Ks[0], Vs[0], *self.qkv_w[0]])[0]
            for i in range(last):
                h, q = self.mid([h, attend(i, q), cos, sin, pos, Ks[i + 1], Vs[i + 1], *self.mlp_w[i],
                                 *self.qkv_w[i + 1]])
            o = attend(last, q)
        h = self.last([h, o, *self.mlp_w[last]])[0]
        return F.rms_norm(h, (h.shape[-1],), self.norm_w, self.eps)


_LOADED: dict[tuple[Path, tuple[str, ...]], dict] = {}


def _loaded(folder: Path, names: tuple[str, ...]) -> dict:
    """The build's graphs, loaded once per process: they take the weights as inputs, so every drafter a replica
    swaps in shares them (a load unpacks the package into a temporary folder and maps its library again)."""
    key = (Path(folder), names)
    if key not in _LOADED:
        _LOADED[key] = {n: torch._inductor.aoti_load_package(str(folder / f"{n}.pt2")).loader.run for n in names}
    return _LOADED[key]


def _examples(s: Shape, plans, norm_w, b=2, T=3):
    """Example inputs (b and T different and > 1, so export keeps them symbolic) and their dynamic dims."""
    p = plans[0]
    h = torch.randn(b, T, s.hidden)
    cos, sin = torch.randn(b, T, 1, s.head_dim), torch.randn(b, T, 1, s.head_dim)
    o = torch.randn(b, s.heads, T, s.head_dim)
    pos = torch.arange(T).repeat(b, 1) + 4
    K, V = torch.zeros(b, s.kv_heads, 16, s.head_dim), torch.zeros(b, s.kv_heads, 16, s.head_dim)
    B, N = torch.export.Dim("rows", min=1, max=MAX_ROWS), torch.export.Dim("tokens", min=1, max=MAX_TOKENS)
    C = torch.export.Dim("capacity", min=2, max=1 << 20)
    S = torch.export.Dim("span", min=1, max=1 << 20)
    keys = torch.arange(9)  # a span apart from every other example size (and <= the capacity, 16)
    bt3, bt4, bo, kv, ks = {0: B, 1: N}, {0: B, 1: N}, {0: B, 2: N}, {0: B, 2: C}, {0: S}
    qkv = (p.in_w, *p.qkv)
    mlp = (*p.o, p.post_w, *p.gate_up, *p.down)
    return {
        "first": ((h, cos, sin, pos, K, V, *qkv), (bt3, bt4, bt4, bt3, kv, kv) + (None,) * 3),
        "mid": ((h, o, cos, sin, pos, K, V, *mlp, *qkv), (bt3, bo, bt4, bt4, bt3, kv, kv) + (None,) * 10),
        "last": ((h, o, *mlp), (bt3, bo) + (None,) * 7),
        "first_attend": ((h, cos, sin, pos, keys, K, V, *qkv), (bt3, bt4, bt4, bt3, ks, kv, kv) + (None,) * 3),
        "mid_attend": ((h, o, cos, sin, pos, keys, K, V, *mlp, *qkv),
                       (bt3, bo, bt4, bt4, bt3, ks, kv, kv) + (None,) * 10),
    }


def graph_names(layers: int, chunks: bool) -> tuple[str, ...]:
    """The graphs a body of ``layers`` layers uses: the "mid" ones only past one layer, the attention-free ones
    only where prompt chunks are served (a drafter reads its backlog as verification-like steps)."""
    names = ["first_attend", "last"] + (["mid_attend"] if layers > 1 else [])
    if chunks:
        names += ["first"] + (["mid"] if layers > 1 else [])
    return tuple(names)


def _build(folder: Path, s: Shape, plans, norm_w, names: tuple[str, ...]) -> None:
    """Export and compile the graphs ``names`` into ``folder`` (written elsewhere first, then renamed: replicas
    starting together may build at once, and a reader never sees half a build)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        for name, (args, dims) in _examples(s, plans, norm_w).items():
            if name not in names:
                continue
            ep = torch.export.export(GRAPHS[name](s), args, dynamic_shapes=dims, strict=False)
            torch._inductor.aoti_compile_and_package(ep, package_path=str(work / f"{name}.pt2"))
        try:
            os.rename(work, folder)
        except OSError:  # another process finished first: its build is the same
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def shape_of(body, plans) -> Shape | None:
    """The shared shape of a body's layers, or None where they differ (then the eager layers serve)."""
    cfg = body.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if not plans or any(p is None for p in plans):
        return None
    if len({(p.in_eps, p.post_eps, p.repeat, p.qk_width) for p in plans}) != 1 or plans[0].in_eps != plans[0].post_eps:
        return None
    if plans[0].qk_width != (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim:
        return None
    if body.norm.variance_epsilon != plans[0].in_eps:
        return None
    return Shape(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, plans[0].in_eps,
                 plans[0].repeat)


def compile_layers(body, cache_dir: Path, chunks: bool = True) -> CompiledLayers | None:
    """The body's compiled layers, built into ``cache_dir`` on the first call and loaded after; None (eager)
    where the layers are not 4-bit plans of one shape, or where building fails (no C++ compiler, say).
    ``chunks``: also the graphs a prompt chunk takes (``graph_names``)."""
    from onspec.actors.row_cache import _int4_plan

    plans = [_int4_plan(layer) for layer in body.layers]
    s = shape_of(body, plans)
    if s is None:
        return None
    names = graph_names(len(plans), chunks)
    folder = Path(cache_dir) / s.key(names)
    try:
        if not folder.exists():
            log.info("compiling %d layers into %s (once per torch version and layer shape)", len(plans), folder)
            _build(folder, s, plans, body.norm.weight, names)
            prune_builds(Path(cache_dir))
        with contextlib.suppress(OSError):  # its last use, what prune_builds reads (a read-only dir: none)
            os.utime(folder)
        layers = CompiledLayers(folder, plans, body.norm.weight, names)
        if not _consistent(body, layers):
            log.warning("compiled layers give a query different bits in a batch than alone: serving eager layers")
            return None
        return layers
    except Exception as e:  # noqa: BLE001 - any failure here leaves the eager layers serving, as documented
        log.warning("compiled layers unavailable, serving eager layers: %s", e)
        return None


def prune_builds(cache_dir: Path, idle_days: float = 30.0) -> list[str]:
    """Remove the builds in ``cache_dir`` that no process has loaded for ``idle_days`` (each onspec and torch
    version leaves its own, 3-9 MB, and none of them is ever loaded again); returns their names. A build still
    in use on another node of a shared data dir is loaded, and so kept, by that node's every start."""
    cutoff = time.time() - idle_days * 86400
    gone = []
    for old in Path(cache_dir).iterdir():
        if old.is_dir() and old.stat().st_mtime < cutoff:  # a ".build-" left by a build that died, too
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old.name)
    if gone:
        log.info("removed %d compiled builds unused for %g days from %s", len(gone), idle_days, cache_dir)
    return gone


@torch.inference_mode()
def _consistent(body, layers: CompiledLayers) -> bool:
    """Whether the compiled layers keep the property speculation rests on: a query's hidden state is bitwise the
    same whatever shares its forward. Rows of 30 and 7 positions, then a 3-token verification over both (row 1
    padded to row 0's keys), against row 1's single steps in a cache of another capacity."""
    from onspec.actors.row_cache import RowCache, body_forward

    ids = torch.randint(body.embed_tokens.num_embeddings, (2, 33), generator=torch.Generator().manual_seed(0))
    emb = body.embed_tokens(ids)
    saved, body.compiled_layers = getattr(body, "compiled_layers", None), layers
    try:
        both, one = RowCache(body, 2, 64), RowCache(body, 1, 16)
        body_forward(body, emb[:1, :30], both, 0, torch.tensor([0]))
        body_forward(body, emb[1:, :7], both, 1, torch.tensor([0]))
        verify = body_forward(body, torch.stack([emb[0, 30:33], emb[1, 7:10]]), both, 0, torch.tensor([30, 7]))
        body_forward(body, emb[1:, :7], one, 0, torch.tensor([0]))
        steps = [body_forward(body, emb[1:, 7 + t:8 + t], one, 0, torch.tensor([7 + t])) for t in range(3)]
    finally:
        body.compiled_layers = saved
    return torch.equal(verify[1:], torch.cat(steps, dim=1))
