"""Building blocks whose parameters may be stored in a narrower dtype than they compute in.

Weights can be kept in memory as fp32, fp16, bf16 or fp8 (e4m3fn); every layer casts its weight to the dtype of its
input at call time. The model decides the compute dtype by what it feeds in (fp32 for the modulation path, the
compute dtype for attention and FFN), exactly as Wan2.1 runs under autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CastLinear(nn.Linear):
    """nn.Linear that computes in the input's dtype whatever dtype its weight is stored in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastConv3d(nn.Conv3d):
    """nn.Conv3d that computes in the input's dtype (used for the patch embedding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in fp32, cast back, then scale by the (learned) weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and returned in fp32 (Wan feeds the result into fp32 modulation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def gelu_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> tanh-GELU -> Linear; indices 0 and 2 match Wan's ``ffn`` / ``text_embedding`` key names."""
    return nn.Sequential(CastLinear(in_dim, hidden_dim), nn.GELU(approximate="tanh"), CastLinear(hidden_dim, out_dim))
