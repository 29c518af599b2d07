"""4-bit weight-only linears over the GGUF file's own Q4_1 blocks (``model.dtype: int4``).

The default target ships as Q4_1: every decoder linear is stored in blocks of 32 weights along the input
dimension, each block a half-precision scale d and minimum m and 32 four-bit codes q, w = d * q + m (ggml's
Q4_1). Core torch's group-wise 4-bit CPU matmul (``aten._weight_int4pack_mm_for_cpu``, the kernel gpt-fast's
int4 path uses) computes x @ ((q - 8) * s + z)^T per group of 32, so with s = d and z = m + 8 d it serves those
very codes: no second rounding of the weights. Its scales and activations are bfloat16 inside the matmul
(so d and m are rounded to bf16 there); everything around the linears (norms, attention, the residual stream)
stays in the model's fp32. The output head, stored as Q8_0, runs on the same kernel (``Q8Head``). Reading 4.5 bits instead of 32 per weight is the point: decoding is
memory-bound (BENCHMARKS.md, "4-bit target").

Speculation stays identical to target-only decoding at this precision: the kernel computes each row of x on its
own (a row's result does not depend on the rows beside it), and the target's position-indexed caches compute
each query's attention alone over exactly its keys (``exact_attention``, actors/row_cache.py), so a k-token
verification gives bitwise the hidden states of k single steps. (In fp32 a batched attention's last-bit
differences stay last-bit; bf16 rounding of the next matmul's input would make them visible.)
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32                      # weights per Q4_1 block
BLOCK_BYTES = 2 + 2 + GROUP // 2  # fp16 d, fp16 m, 16 bytes of nibbles


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Rows x [N, K] times packed 4-bit blocks of 32 (torch's int4 CPU matmul): bf16 inside, x's dtype out. The
    one call every 4-bit product here makes (Int4Linear, FusedInt4, Q8Head, the position-indexed layers)."""
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, scales_and_zeros).to(x.dtype)


def q4_1_codes(raw: np.ndarray, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_1 tensor's rows ``raw`` [N, blocks * 20] (uint8, as gguf's reader gives them) as codes q [N, K]
    (0..15), scales d and minimums m [N, K / 32] (fp32, exactly the file's fp16 values). In a block, byte j
    holds weight j in its low nibble and weight j + 16 in its high one (ggml's dequantize_row_q4_1)."""
    n, blocks = raw.shape[0], in_features // GROUP
    b = np.ascontiguousarray(raw).reshape(n, blocks, BLOCK_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, in_features)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(m)


def q8_as_4bit(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit blocks w = d * q (q in -128..127) as 4-bit blocks over the input written twice, [x, x]: q = 16 hi +
    lo with hi = (q >> 4) in -8..7 and lo = q & 15, so x . w = x . (16 d (hi + 8) - 128 d) + x . (d lo). Returns
    4-bit codes [N, 2K] (every hi group, then every lo group), scales and minimums [N, 2K / 32] (w = d q + m)."""
    hi, lo = (q >> 4) + 8, q & 0x0F
    return torch.cat([hi, lo], dim=1), torch.cat([16 * d, d], dim=1), torch.cat([-128 * d, torch.zeros_like(d)], dim=1)


class Int4Linear(nn.Module):
    """y = x W^T with W = d * q + m per block of 32 inputs, on torch's int4 CPU matmul (bf16 inside). With
    ``repeat`` 2 the blocks are 8-bit ones (``q8_as_4bit``) and the input is written twice."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None,
                 repeat: int = 1):
        super().__init__()
        self.out_features, self.in_features = q.shape[0], q.shape[1] // repeat
        self.repeat = repeat
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # (q - 8) * s + z == d * q + m with s = d, z = m + 8 d; the kernel takes [K / 32, N, 2].
        sz = torch.stack([d.t(), (m + 8 * d).t()], dim=-1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        # The file's own codes and scales, kept as compactly as the file has them (two codes a byte, fp16) for
        # dequantized(): a drafter that copies the target's layers, and the tests.
        q8 = q.to(torch.uint8)
        self.register_buffer("codes", q8[:, 0::2] | (q8[:, 1::2] << 4), persistent=False)
        self.register_buffer("d", d.to(torch.float16), persistent=False)
        self.register_buffer("m", m.to(torch.float16), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.bulk, self.bulk_rows = None, 0  # use_bulk_matmuls

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4) -> "Int4Linear":
        """Blocks of a float weight, for weights no file holds quantized (a trained drafter). 4 bits as llama.cpp's
        Q4_1 makes them: per 32 inputs, m = min and d = (max - min) / 15, q = round((w - m) / d); 8 bits as its
        Q8_0: d = max |w| / 127, q = round(w / d)."""
        w = weight.detach().float()
        n, k = w.shape
        g = w.view(n, k // GROUP, GROUP)
        if bits == 8:
            d = (g.abs().amax(-1) / 127).clamp_min(1e-12)
            q = (g / d[..., None]).round().clamp(-127, 127).view(n, k).to(torch.int32)
            return cls(*q8_as_4bit(q, d), bias, repeat=2)
        if bits != 4:
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((g - lo[..., None]) / d[..., None]).round().clamp(0, 15).view(n, k)
        return cls(q.to(torch.int32), d, lo, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.bulk is not None and x2.shape[0] >= self.bulk_rows:
            y = bulk_mm(x2, self.bulk)
        else:
            y = int4_mm(repeated(x2, self.repeat), self.packed, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The file's weights in fp32: d * q + m, block by block (an 8-bit block's two halves summed)."""
        n, k = self.out_features, self.in_features * self.repeat
        q = torch.stack([self.codes & 0x0F, self.codes >> 4], dim=-1).float().view(n, k // GROUP, GROUP)
        w = (self.d.float()[..., None] * q + self.m.float()[..., None]).view(n, self.repeat, self.in_features)
        return w.sum(dim=1)

    def extra_repr(self) -> str:
        kind = "Q4_1" if self.repeat == 1 else "8-bit"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} blocks of {GROUP}"


def repeated(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """The input of a 4-bit product whose weights are 8-bit blocks: [x, x] (q8_as_4bit)."""
    return x if repeat == 1 else torch.cat([x] * repeat, dim=-1)


def q8_0_codes(raw: np.ndarray, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's rows ``raw`` [N, blocks * 34] as codes q [N, K] (int8 values as int32) and scales d
    [N, K / 32] (fp32, exactly the file's fp16): w = d * q per block of 32 (ggml's dequantize_row_q8_0)."""
    n, blocks = raw.shape[0], in_features // GROUP
    b = np.ascontiguousarray(raw).reshape(n, blocks, 2 + GROUP)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[..., 2:].copy().view(np.int8).reshape(n, in_features)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d)


class Q8Head(nn.Module):
    """The output head over the file's Q8_0 blocks (w = d * q, q an int8), on the same 4-bit kernel: q = 16 hi +
    lo with hi in -8..7 and lo in 0..15, so x . w = x . (16 d hi) + x . (d lo) is one 4-bit matmul over the
    input written twice, hi's groups with scale 16 d and lo's with scale d and zero 8 d. The weights are the
    file's (d rounded to bf16 as for the Q4_1 linears); the matmul reads 36 MB instead of the fp32 head's 113,
    and the logits come out in bf16. ``weight`` stays the fp32 (tied) matrix for code that reads it."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        n, k = q.shape
        self.out_features, self.in_features, self.weight = n, k, weight
        codes, d2, m2 = q8_as_4bit(q, d)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
                             persistent=False)
        self.register_buffer("scales_and_zeros", torch.stack([d2.t(), (m2 + 8 * d2).t()], dim=-1).contiguous()
                             .to(torch.bfloat16), persistent=False)
        self.bulk, self.bulk_rows = None, 0  # use_bulk_matmuls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.bulk is not None and x2.shape[0] >= self.bulk_rows:
            y = bulk_mm(x2, self.bulk)
        else:
            y = int4_mm(repeated(x2, 2), self.packed, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight.detach().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks of {GROUP}"


# GGUF tensor names of a Llama block's linears -> the transformers module path under model.layers[i]
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


def _hf_row_order(rows: int, heads: int) -> np.ndarray:
    """Which GGUF row each transformers row of attn_q / attn_k is: llama.cpp's converter interleaves the rotary
    halves of every head; transformers' loader undoes it (LlamaTensorProcessor._reverse_permute_weights)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


def use_gguf_int4(model: nn.Module, gguf_path: Path) -> int:
    """Replace every decoder linear stored as Q4_1 in ``gguf_path`` by an Int4Linear over its blocks; returns
    how many were replaced (the others keep their float weights)."""
    from gguf import GGMLQuantizationType, GGUFReader

    if not hasattr(torch, "_weight_int4pack_mm_for_cpu") or next(model.parameters()).device.type != "cpu":
        raise ValueError("model.dtype int4 needs torch's int4 CPU matmul and a CPU target")
    cfg = model.config
    layers = model.model.layers
    done = 0
    head = model.get_output_embeddings()
    # The head's rows: its own tensor, or the token embedding it is tied to.
    head_name = "token_embd.weight" if head.weight is model.get_input_embeddings().weight else "output.weight"
    for t in GGUFReader(str(gguf_path)).tensors:
        if t.name == head_name and t.tensor_type == GGMLQuantizationType.Q8_0 and head.bias is None:
            q, d = q8_0_codes(np.asarray(t.data), head.in_features)
            model.lm_head = Q8Head(q, d, head.weight)
            continue
        parts = t.name.split(".")  # blk.<i>.<kind>.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in LINEARS:
            continue
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        owner, attr = layers[int(parts[1])], LINEARS[parts[2]]
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        old = getattr(owner, name)
        if old.bias is not None or old.out_features % 16 or old.in_features % GROUP:  # what the kernel packs
            continue
        q, d, m = q4_1_codes(np.asarray(t.data), old.in_features)
        if parts[2] in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if parts[2] == "attn_q" else cfg.num_key_value_heads
            order = torch.from_numpy(_hf_row_order(q.shape[0], heads))
            q, d, m = q[order], d[order], m[order]
        setattr(owner, name, Int4Linear(q, d, m))
        done += 1
    for layer in layers:
        fuse_projections(layer)
    # The kernel rounds its inputs to bf16, which turns the last-bit differences of batched attention into
    # visible ones: the position-indexed caches then compute each query's attention alone (row_cache.py).
    model.model.exact_attention = done > 0
    return done


class FusedInt4(nn.Module):
    """Several Int4Linears over the same input as one matmul (q, k, v; gate, up): one call and one bf16 cast
    instead of three, which matters when a decoding step is a few hundred small calls. The kernel computes
    every output column on its own, so each part's columns are bitwise what its own module gives (test)."""

    def __init__(self, parts: list[Int4Linear]):
        super().__init__()
        self.in_features, self.repeat = parts[0].in_features, parts[0].repeat
        self.sizes = [p.out_features for p in parts]
        codes = torch.cat([p.codes for p in parts])
        q = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(codes.shape[0], -1).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1),
                             persistent=False)
        # Where the kernel's packing lines up with the parts' rows (the model's sizes), the parts keep serving
        # alone (transformers' own forward) from views of the fused codes: no second copy.
        start = 0
        for p, n in zip(parts, self.sizes):
            rows = self.packed[start:start + n]
            if torch.equal(rows, p.packed):
                p.packed = rows
            start += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, [..., sum(sizes)]."""
        return int4_mm(repeated(x.reshape(-1, self.in_features), self.repeat), self.packed, self.scales_and_zeros) \
            .reshape(*x.shape[:-1], -1)


def bulk_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, K] times a bf16 weight [M, K] (oneDNN's bf16 GEMM), x's dtype out: see use_bulk_matmuls."""
    return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)


def use_bulk_matmuls(model: nn.Module, min_rows: int) -> int:
    """From now on, every 4-bit linear and 8-bit head of ``model`` called on at least ``min_rows`` rows runs as a
    bf16 matmul over its dequantized weights (0: never; the 4-bit kernel serves every call). Returns how many
    modules switched.

    Why: torch's 4-bit CPU kernel dequantizes the weights again for every block of 4 rows, so over hundreds of
    rows it is compute-bound, while oneDNN's bf16 GEMM reuses each weight across rows (2.3-2.5x faster per matmul
    from ~128 rows here, slower under ~16). The weights are then the file's rounded once more, to bf16, which moves
    the target's argmax at ~3% of positions: fine for text that only needs writing (pretraining's answers,
    batched generate 1.4x faster), not for the teacher, which scores at the served precision, nor for a served
    step (BENCHMARKS.md, "Pretraining's answers in bf16")."""
    done = 0
    for m in model.modules():
        if isinstance(m, (Int4Linear, Q8Head)):
            if min_rows <= 0:
                m.bulk, m.bulk_rows = None, 0
            elif m.bulk is None:
                m.bulk, m.bulk_rows = m.dequantized().to(torch.bfloat16).contiguous(), min_rows
            else:
                m.bulk_rows = min_rows
            done += 1
    return done


def fits_kernel(lin: nn.Module) -> bool:
    """Whether the 4-bit kernel can pack this linear's weight (rows in 16s, inputs in blocks of 32)."""
    return isinstance(lin, nn.Linear) and lin.out_features % 16 == 0 and lin.in_features % GROUP == 0


def int4_copy(module: nn.Module, shared: dict[int, object] | None = None, bits: int = 4) -> nn.Module:
    """A copy of ``module`` with every nn.Linear the kernel fits as 4- or 8-bit blocks (``Int4Linear.from_float``)
    and its decoder layers' projections fused: how a drafter follows a 4-bit target (a forward per drafted
    token, so its cost counts as much as its bytes). ``shared`` (id -> object, deepcopy's memo) names tensors
    the copy keeps sharing, e.g. the target's embedding."""
    shared = dict(shared or {})
    out = copy.deepcopy(module, memo=dict(shared))
    for parent in list(out.modules()):
        if id(parent) in shared:  # someone else's module (the target's): never changed here
            continue
        for name, child in list(parent.named_children()):
            if fits_kernel(child):
                setattr(parent, name, Int4Linear.from_float(child.weight, child.bias, bits))
    for layer in out.modules():
        if hasattr(layer, "self_attn") and hasattr(layer, "mlp") and id(layer) not in shared:
            fuse_projections(layer)
    return out


def fuse_projections(layer: nn.Module) -> None:
    """Give a decoder layer ``self_attn.qkv`` and ``mlp.gate_up`` when its projections are all Int4Linear (the
    position-indexed forward, actors/row_cache.py, uses them when present)."""
    attn, mlp = layer.self_attn, layer.mlp
    def fusable(parts):
        return all(isinstance(m, Int4Linear) and m.repeat == parts[0].repeat for m in parts)
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    if fusable(qkv):
        attn.qkv = FusedInt4(qkv)
    gate_up = [mlp.gate_proj, mlp.up_proj]
    if fusable(gate_up):
        mlp.gate_up = FusedInt4(gate_up)


def float_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every Int4Linear as the plain fp32 weight it serves (what a drafter that
    copies the target's layers, or anything expecting nn.Linear weights, loads)."""
    state = module.state_dict()
    for path, sub in module.named_modules():
        if isinstance(sub, Int4Linear):
            prefix = f"{path}." if path else ""
            state.pop(prefix + "packed", None)
            state.pop(prefix + "scales_and_zeros", None)
            state[prefix + "weight"] = sub.dequantized()
    return state
