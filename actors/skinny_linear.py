"""Linear layers for a handful of rows on the CPU, in whichever orientation this machine runs faster.

Decoding and verification multiply a few token rows by large weight matrices, and which way BLAS is asked for
that product matters more than the FLOPs: with MKL on an AMD EPYC, x @ W^T for 2..16 rows cost ~1.7x the
single-row product while (W @ x^T)^T stayed within ~1.1x of it, and a single row ran at half the bandwidth of a
two-column product (so one row was best computed as two); on an Intel Xeon (AMX) the same fp32 products go the
other way, 13 ms for 90 matrices as x @ W^T against 34 ms as W @ x^T (BENCHMARKS.md). So the first call per
dtype times the candidates on a bank of weights larger than the cache, for 1, 2, 4, 8 and 16 rows, and every
later call takes the winner for its row count. Written by hand because no library exposes the choice; every
candidate is the same matrix product.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16
_SIZES = (1, 2, 4, 8, 16)
_PLANS: dict[torch.dtype, dict[int, str]] = {}


def _product(how: str, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if how == "linear":
        return F.linear(x2, weight)
    if how == "two":  # one row computed as a two-column product, the copy dropped
        return (weight @ x2.expand(2, -1).contiguous().T).T[:1]
    return (weight @ x2.T).T


@torch.no_grad()
def _measure(dtype: torch.dtype, reps: int = 3) -> dict[int, str]:
    """{rows: the fastest way} for this machine and dtype, timed on 24 weights of 1536 x 576 (the MLP's shape,
    most of the bytes; 85 MB in fp32, so mostly out of cache like a model's weights)."""
    gen = torch.Generator().manual_seed(0)
    bank = [torch.randn(1536, 576, generator=gen).to(dtype) for _ in range(24)]
    plan = {}
    for rows in _SIZES:
        x = torch.randn(rows, 576, generator=gen).to(dtype)
        best, best_s = "linear", float("inf")
        for how in ("linear", "columns") + (("two",) if rows == 1 else ()):
            s = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                for w in bank:
                    _product(how, x, w)
                s = min(s, time.perf_counter() - t)
            if s < best_s:
                best, best_s = how, s
        plan[rows] = best
    return plan


def plan_for(dtype: torch.dtype) -> dict[int, str]:
    if dtype not in _PLANS:
        _PLANS[dtype] = _measure(dtype)
    return _PLANS[dtype]


class SkinnyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if 0 < rows <= MAX_ROWS and x.device.type == "cpu":
            plan = plan_for(self.weight.dtype)
            how = plan[next(n for n in _SIZES if n >= rows)]
            if how == "linear":
                return super().forward(x)
            y = _product(how, x.reshape(rows, x.shape[-1]), self.weight)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


def use_skinny_linear(model: nn.Module) -> nn.Module:
    """Switch every plain nn.Linear in ``model`` to SkinnyLinear in place (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
    return model
