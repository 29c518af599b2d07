"""Linear layers computed as W @ x^T for a handful of rows, on the CPU.

Decoding and verification multiply a few token rows by large weight matrices. With the MKL build of torch on
this CPU, x @ W^T for 2..16 rows takes a path that costs ~1.7x the single-row one, while the same product
oriented as (W @ x^T)^T stays within ~1.1x of it up to ~5 rows (measured in BENCHMARKS.md). Verification of k
drafts is one forward over k + 1 rows, so this orientation is what lets speculation pay off here.
Written by hand because no library exposes the choice; the result is the same matrix product.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 16


class SkinnyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if 0 < rows <= MAX_ROWS and x.device.type == "cpu":
            x2 = x.reshape(rows, x.shape[-1])
            if rows == 1:
                # MKL's matrix-vector path streams a weight that is not in cache at about half the bandwidth of
                # its two-column product (measured: 90 matrices of 1536x576, 19 ms vs 10 ms), so a single row is
                # computed as two and one is dropped: a 1-token forward then costs what a 2-token one does.
                x2 = x2.expand(2, -1).contiguous()
            y = (self.weight @ x2.T).T[:rows]
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
