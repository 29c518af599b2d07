"""Many sequences through one Llama body at once: a KV cache indexed by position per row (gpt-fast's layout) and
the body's forward over ragged rows.

Row ``r`` of a ``RowCache`` holds ``lengths[r]`` valid positions. A forward over rows ``start .. start+b-1``
feeds each row T new tokens at positions ``lengths[r] .. lengths[r]+T-1``, writes their keys and values there
and lets every query see the keys at positions <= its own. A row with fewer real tokens than T is padded: the
padding writes junk at positions past the row's real ones, which no real query can see (causality) and which the
row's next forward overwrites before reading. So rejecting drafts is only a smaller length (nothing is copied),
rows of any lengths share one forward, and a finished row's slot is reused.

Written here rather than taken from transformers: its caches keep one length for the whole batch (DynamicCache,
StaticCache's shared cache_position), and padding a batch to one length would have to mask holes in every row
after each rejection. The layers' own modules (projections, norms, MLP, rotary embedding) are transformers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from onspec.actors.int4_linear import Int4Linear, int4_mm, repeated


class RowCache:
    """Keys and values of ``slots`` rows for every layer of one body, grown (doubling) as rows get longer."""

    def __init__(self, body, slots: int, capacity: int = 256, max_capacity: int = 1 << 30):
        cfg = body.config
        self.layers = len(body.layers)
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(body.parameters())
        self.dtype, self.device = p.dtype, p.device
        # Attention of each query over exactly the keys it sees, as a single step computes it (set on bodies
        # whose rounding would amplify the last-bit differences of a batched kernel: actors/int4_linear.py).
        self.exact = bool(getattr(body, "exact_attention", False))
        self.slots, self.max_capacity = slots, max_capacity
        self.capacity = 0
        self._rows_key = None  # rows(): the (start, b, capacity) its views are for
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ensure(min(capacity, max_capacity))

    @torch.inference_mode()
    def ensure(self, capacity: int) -> None:
        """Room for ``capacity`` positions in every row (kept contents)."""
        if capacity <= self.capacity:
            return
        new = min(max(capacity, 2 * self.capacity), max(self.max_capacity, capacity))
        shape = (self.slots, self.kv_heads, new, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for old, fresh in zip(self.k + self.v, k + v):
            fresh[:, :, :self.capacity] = old
        self.k, self.v, self.capacity = k, v, new

    def rows(self, start: int, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values of rows ``start .. start+b-1`` (views, kept while the rows and the
        capacity stay: a decoding loop asks for the same ones every step)."""
        key = (start, b, self.capacity)
        if self._rows_key != key:
            self._rows = ([k[start:start + b] for k in self.k], [v[start:start + b] for v in self.v])
            self._rows_key = key
        return self._rows

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst`` (packing rows after one leaves)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


def body_forward(body, embeds: torch.Tensor, cache: RowCache, start: int, lengths: torch.Tensor,
                 prompt_chunk: bool = False) -> torch.Tensor:
    """A LlamaModel's forward (``body``: its layers, rotary embedding and final norm) over ``embeds`` [b, T, H]
    for cache rows ``start .. start+b-1`` holding ``lengths`` [b] positions. Writes the new keys and values at
    positions lengths[r] + t and returns the post-norm hidden states [b, T, H] (what an lm_head reads).

    ``prompt_chunk``: a chunk of one row's prompt. Even in exact mode its attention is then one causal product per
    layer (SDPA's flash kernel for the first chunk, its masked path after it) instead of one call per query: 3-10x
    faster. It is not bitwise what single steps would compute. That is safe because a prompt's chunks are always
    computed this same way: in speculative and target-only decoding alike, and again when another replica resumes
    the request (its streamed output follows the prompt per query, as it was decoded)."""
    b, T, _ = embeds.shape
    steps = torch.arange(T, device=embeds.device)
    pos = lengths.to(embeds.device)[:, None] + steps                     # [b, T]
    span = int(lengths.max()) + T                                        # keys any query here can see
    cache.ensure(span)
    rope = _rope(body, embeds, pos)
    compiled = getattr(body, "compiled_layers", None)
    if compiled is not None and not (prompt_chunk and compiled.chunks):
        # The graphs' own attention, each query over exactly its keys (compiled_layers.exact_attention).
        Ks, Vs = cache.rows(start, b)
        return compiled.forward(embeds, rope, pos, Ks, Vs, span=span)
    if cache.exact and not prompt_chunk:
        spans, mask = (pos + 1).tolist(), None
    elif prompt_chunk and span == T:  # the prompt's first chunk: causal over its own keys (_attention)
        spans, mask = None, None
    else:
        spans, keys = None, torch.arange(span, device=embeds.device)
        mask = keys[None, None, None, :] <= pos[:, None, :, None]       # [b, 1, T, span]: causal per row
    if compiled is not None:  # a prompt chunk: causal SDPA between the attention-free graphs
        Ks, Vs = cache.rows(start, b)

        def attend(i, q):  # layer i's attention, eager between the compiled pieces (they wrote its k and v)
            return _attention(q, Ks[i], Vs[i], mask, span, spans).contiguous()
        return compiled.forward(embeds, rope, pos, Ks, Vs, attend)
    where = pos[:, None, :, None].expand(b, cache.kv_heads, T, cache.head_dim)
    h = embeds
    for i, layer in enumerate(body.layers):
        h = _layer(layer, h, rope, cache.k[i][start:start + b], cache.v[i][start:start + b], where, mask,
                   span, cache.head_dim, spans)
    return _norm(body.norm, h)


def _attention(q, K, V, mask, span, spans):
    """Scaled dot-product attention over the rows' keys. ``spans`` [b][T] (exact mode): each query alone over
    exactly its keys 0..spans-1, so that its result is bitwise what a one-token step of that row computes
    (a batched kernel's reduction order depends on the shapes around it)."""
    gqa = q.shape[1] != K.shape[1]
    if spans is None:  # no mask: a prompt's first chunk, causal (body_forward's prompt_chunk)
        return F.scaled_dot_product_attention(q, K[:, :, :span], V[:, :, :span], attn_mask=mask,
                                              is_causal=mask is None, enable_gqa=gqa)
    # No mask is needed over exactly the visible keys, and none is faster: CPU SDPA with a mask takes a slow path.
    if len(spans) == 1 and len(spans[0]) == 1:  # one decoding step: no slicing or joining
        return F.scaled_dot_product_attention(q, K[:, :, :span], V[:, :, :span], enable_gqa=gqa)
    return torch.cat([torch.cat([
        F.scaled_dot_product_attention(q[r:r + 1, :, t:t + 1], K[r:r + 1, :, :n], V[r:r + 1, :, :n], enable_gqa=gqa)
        for t, n in enumerate(row)], dim=2) for r, row in enumerate(spans)])


def _norm(norm, h):
    """LlamaRMSNorm as torch's single op (bitwise the module's result, in fewer dispatches)."""
    return F.rms_norm(h, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rope(body, embeds, pos):
    """cos and sin for rotary embedding at ``pos`` [b, T], shaped [b, T, 1, d] to broadcast over heads, with
    rotate_half's sign folded into sin's first half (x2 * -s is bitwise -x2 * s): computed once per forward."""
    cos, sin = body.rotary_emb(embeds, pos)
    half = sin.shape[-1] // 2
    return cos[:, :, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, :, None]


@dataclass(frozen=True)
class _Int4Plan:
    """A 4-bit decoder layer's tensors gathered once: at one token a step, looking up a module's attributes and
    calling it cost as much as the small operations between the matmuls (the layer runs ~15% faster without)."""
    in_w: torch.Tensor
    in_eps: float
    post_w: torch.Tensor
    post_eps: float
    qkv: tuple[torch.Tensor, torch.Tensor]
    qk_width: int
    o: tuple[torch.Tensor, torch.Tensor]
    gate_up: tuple[torch.Tensor, torch.Tensor]
    down: tuple[torch.Tensor, torch.Tensor]
    repeat: int  # 2: the linears are 8-bit blocks, their inputs written twice (int4_linear.q8_as_4bit)


def _int4_plan(layer) -> _Int4Plan | None:
    """The layer's plan (made on its first forward; a layer's modules do not change after that), or None when
    it is not a 4-bit layer of the usual shape: then the modules are called as they are."""
    plan = layer.__dict__.get("_int4_plan", False)
    if plan is not False:
        return plan
    attn, mlp = layer.self_attn, layer.mlp
    plain = all(isinstance(m, Int4Linear) and m.bias is None for m in (attn.o_proj, mlp.down_proj))
    plan = None
    if plain and hasattr(attn, "qkv") and hasattr(mlp, "gate_up") and isinstance(mlp.act_fn, type(ACT2FN["silu"])) \
            and len({m.repeat for m in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)}) == 1:
        pair = (lambda m: (m.packed, m.scales_and_zeros))
        plan = _Int4Plan(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                         layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                         pair(attn.qkv), sum(attn.qkv.sizes[:2]), pair(attn.o_proj), pair(mlp.gate_up),
                         pair(mlp.down_proj), attn.o_proj.repeat)
    layer.__dict__["_int4_plan"] = plan
    return plan


def _layer_int4(p: _Int4Plan, h, rope, K, V, where, mask, span, head_dim, spans):
    """``_layer`` for a 4-bit layer from its plan: the same operations in the same order (bitwise the same)."""
    b, T, H = h.shape
    x = F.rms_norm(h, (H,), p.in_w, p.in_eps).view(b * T, H)
    y = int4_mm(repeated(x, p.repeat), *p.qkv)
    qk = y[:, :p.qk_width].view(b, T, -1, head_dim)
    cos, sin = rope
    qk = (qk * cos + qk.roll(head_dim // 2, dims=-1) * sin).transpose(1, 2)
    nq = qk.shape[1] - K.shape[1]
    K.scatter_(2, where, qk[:, nq:].to(K.dtype))
    V.scatter_(2, where, y[:, p.qk_width:].view(b, T, -1, head_dim).transpose(1, 2).to(V.dtype))
    o = _attention(qk[:, :nq], K, V, mask, span, spans)
    h = h + int4_mm(repeated(o.transpose(1, 2).reshape(b * T, -1), p.repeat), *p.o).view(b, T, H)
    x = F.rms_norm(h, (H,), p.post_w, p.post_eps).view(b * T, H)
    gate, up = int4_mm(repeated(x, p.repeat), *p.gate_up).chunk(2, dim=-1)
    return h + int4_mm(repeated(F.silu(gate) * up, p.repeat), *p.down).view(b, T, H)


def _layer(layer, h, rope, K, V, where, mask, span, head_dim, spans=None):
    """One decoder layer (pre-norm attention + MLP, as LlamaDecoderLayer) reading and writing rows K, V. Written
    as few tensor operations as it can be: at a few tokens per step, each one's dispatch costs about as much as
    its arithmetic."""
    plan = _int4_plan(layer)
    if plan is not None:
        return _layer_int4(plan, h, rope, K, V, where, mask, span, head_dim, spans)
    attn, mlp = layer.self_attn, layer.mlp
    b, T, _ = h.shape
    x = _norm(layer.input_layernorm, h)
    qk, v = torch.cat((attn.q_proj(x), attn.k_proj(x)), dim=-1), attn.v_proj(x)
    # q and k rotated together: x * cos + rotate_half(x) * sin, as apply_rotary_pos_emb
    qk = qk.view(b, T, -1, head_dim)
    cos, sin = rope
    qk = (qk * cos + qk.roll(head_dim // 2, dims=-1) * sin).transpose(1, 2)
    nq = qk.shape[1] - K.shape[1]
    K.scatter_(2, where, qk[:, nq:].to(K.dtype))
    V.scatter_(2, where, v.view(b, T, -1, head_dim).transpose(1, 2).to(V.dtype))
    o = _attention(qk[:, :nq], K, V, mask, span, spans)
    h = h + attn.o_proj(o.transpose(1, 2).reshape(b, T, -1))
    return h + mlp(_norm(layer.post_attention_layernorm, h))
