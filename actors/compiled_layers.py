"""The 4-bit target's layers compiled ahead of time (AOTInductor): the work between two attentions as one call.

At one to a few tokens a step, a 4-bit layer's ~25 eager operations cost more in dispatch than in arithmetic
(BENCHMARKS.md, "A compiled step"). Three graphs cover the body, every layer sharing them with its weights
passed as inputs:

- ``first``: input norm, q/k/v projection, rotary embedding and cache write of layer 0;
- ``mid``: layer i's output projection and MLP, then layer i + 1's norm, q/k/v, rotary embedding and cache
  write;
- ``last``: the last layer's output projection and MLP (the final norm is one eager op after it).

The graphs write each layer's keys and values into the rows' caches in place. Attention stays eager between
them (``row_cache.body_forward``), each query over exactly its keys as before, and the graphs compute each row
on its own, so a verification stays bitwise the single steps it stands for (checked when the layers load:
``_consistent``). The graphs are not bitwise the eager layers (their silu and norms round differently in the
last bit), so a process serves one path only, chosen at load: a replica that falls back to eager stays exact
but may part from a compiled replica's greedy text after a near-tie, as two builds of any engine do.

Rows, tokens and cache capacity are dynamic dimensions, so one build serves decoding, verification, batches
and prompt chunks. Builds are cached in the data dir (``compiled/<key>/``), keyed by torch's version, the CPU's
vector instructions, the layer shape and this file, so a second start loads them in a fraction of a second.
The generated calls run through the package loader directly: its pytree wrapper costs more than a small graph.

Why not ``torch.compile`` of the whole step: measured slower here (its guards and Python wrapper, and a graph
that mutates the caches copies them); AOTInductor's C++ wrapper has neither.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
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

    def key(self) -> str:
        source = Path(__file__).read_bytes()
        # The generated code is for this CPU's vector instructions: a data dir shared by nodes of other CPUs
        # must not load it there.
        cpu = torch.backends.cpu.get_cpu_capability()
        text = f"{torch.__version__}|{cpu}|{self}|{hashlib.sha256(source).hexdigest()}"
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


class CompiledLayers:
    """A body's 4-bit layers as the three loaded graphs, with each layer's inputs gathered once."""

    def __init__(self, folder: Path, plans, norm_w: torch.Tensor):
        loaders = {n: torch._inductor.aoti_load_package(str(folder / f"{n}.pt2")).loader
                   for n in ("first", "mid", "last")}
        self.first, self.mid, self.last = loaders["first"].run, loaders["mid"].run, loaders["last"].run
        self.qkv_w = [[p.in_w, *p.qkv] for p in plans]
        self.mlp_w = [[*p.o, p.post_w, *p.gate_up, *p.down] for p in plans]
        self.norm_w, self.eps = norm_w, plans[0].in_eps

    def forward(self, h, rope, pos, Ks, Vs, attend):
        """The body over hidden states ``h`` [b, T, H] at positions ``pos`` [b, T] of the rows' caches ``Ks``,
        ``Vs`` (per layer [b, kv_heads, capacity, head_dim], contiguous); ``attend(i, q)`` returns layer i's
        attention output [b, heads, T, head_dim]. Returns the final-normed hidden states."""
        # The generated code indexes its inputs as the contiguous examples it was built from (it does not read
        # strides): a view such as a slice of the prompt's embeddings must be copied first.
        h, cos, sin, pos = h.contiguous(), rope[0].contiguous(), rope[1].contiguous(), pos.contiguous()
        q = self.first([h, cos, sin, pos, Ks[0], Vs[0], *self.qkv_w[0]])[0]
        last = len(self.mlp_w) - 1
        for i in range(last):
            h, q = self.mid([h, attend(i, q), cos, sin, pos, Ks[i + 1], Vs[i + 1], *self.mlp_w[i],
                             *self.qkv_w[i + 1]])
        h = self.last([h, attend(last, q), *self.mlp_w[last]])[0]
        return F.rms_norm(h, (h.shape[-1],), self.norm_w, self.eps)


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
    bt3, bt4, bo, kv = {0: B, 1: N}, {0: B, 1: N}, {0: B, 2: N}, {0: B, 2: C}
    qkv = (p.in_w, *p.qkv)
    mlp = (*p.o, p.post_w, *p.gate_up, *p.down)
    return {
        "first": ((h, cos, sin, pos, K, V, *qkv), (bt3, bt4, bt4, bt3, kv, kv) + (None,) * 3),
        "mid": ((h, o, cos, sin, pos, K, V, *mlp, *qkv), (bt3, bo, bt4, bt4, bt3, kv, kv) + (None,) * 10),
        "last": ((h, o, *mlp), (bt3, bo) + (None,) * 7),
    }


def _build(folder: Path, s: Shape, plans, norm_w) -> None:
    """Export and compile the three graphs into ``folder`` (written elsewhere first, then renamed: replicas
    starting together may build at once, and a reader never sees half a build)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    try:
        modules = {"first": _First(s), "mid": _Mid(s), "last": _Last(s)}
        for name, (args, dims) in _examples(s, plans, norm_w).items():
            ep = torch.export.export(modules[name], args, dynamic_shapes=dims, strict=False)
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


def compile_layers(body, cache_dir: Path) -> CompiledLayers | None:
    """The body's compiled layers, built into ``cache_dir`` on the first call and loaded after; None (eager)
    where the layers are not 4-bit plans of one shape, or where building fails (no C++ compiler, say)."""
    from onspec.actors.row_cache import _int4_plan

    plans = [_int4_plan(layer) for layer in body.layers]
    s = shape_of(body, plans)
    if s is None:
        return None
    folder = Path(cache_dir) / s.key()
    try:
        if not (folder / "last.pt2").exists():
            log.info("compiling the target's layers into %s (once per torch version and model shape)", folder)
            _build(folder, s, plans, body.norm.weight)
        layers = CompiledLayers(folder, plans, body.norm.weight)
        if not _consistent(body, layers):
            log.warning("compiled layers give a query different bits in a batch than alone: serving eager layers")
            return None
        return layers
    except Exception as e:  # noqa: BLE001 - any failure here leaves the eager layers serving, as documented
        log.warning("compiled layers unavailable, serving eager layers: %s", e)
        return None


@torch.inference_mode()
def _consistent(body, layers: CompiledLayers) -> bool:
    """Whether the compiled layers keep the property speculation rests on: a query's hidden state is bitwise the
    same whatever shares its forward. Two rows' prompts, then a ragged 3-token verification over both rows,
    against one row's single steps (the shapes the engine runs)."""
    from onspec.actors.row_cache import RowCache, body_forward

    ids = torch.randint(body.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    emb = body.embed_tokens(ids)
    saved, body.compiled_layers = getattr(body, "compiled_layers", None), layers
    try:
        both, one = RowCache(body, 2, 16), RowCache(body, 1, 16)
        body_forward(body, emb[:, :7], both, 0, torch.tensor([0, 0]))
        verify = body_forward(body, emb[:, 7:10], both, 0, torch.tensor([7, 7]))
        body_forward(body, emb[1:, :7], one, 0, torch.tensor([0]))
        steps = [body_forward(body, emb[1:, 7 + t:8 + t], one, 0, torch.tensor([7 + t])) for t in range(3)]
    finally:
        body.compiled_layers = saved
    return torch.equal(verify[1:], torch.cat(steps, dim=1))
