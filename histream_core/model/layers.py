"""Building blocks whose parameters may be stored in a narrower dtype than they compute in.

Weights can be kept in memory as fp32, fp16, bf16 or fp8 (e4m3fn), an fp8 weight with or without a scale (one
number, or one per output channel: real weight = weight * weight_scale); every layer casts its weight to the dtype
of its input at call time. The model decides the compute dtype by what it feeds in (fp32 for the modulation path, the
compute dtype for attention and FFN), exactly as Wan2.1 runs under autocast.

``Fp8Linear`` is the other way round: an inference speed option that also multiplies in fp8 (see its docstring).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cache import FP8, quantize_fp8
from ..weight_files import dequantize

log = logging.getLogger(__name__)


def real_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A CastLinear's or CastConv3d's weight in ``dtype``, scaled back if it is stored as scaled fp8."""
    if layer.weight_scale is None:
        return layer.weight.to(dtype)
    return dequantize(layer.weight, layer.weight_scale, dtype)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight # [out, ...] -> (float8 e4m3 values, scale # [out, 1] fp32), one scale per output channel.

    Per-channel scales keep small weights out of e4m3's subnormal range, where a raw cast loses their bits
    (benchmarks/NOTES.md: on random 1.3B weights a raw cast moved x0 three times as much as the fp8 matmul)."""
    values, scale = quantize_fp8(weight.detach().flatten(1).float(), torch.float32)
    return values.reshape(weight.shape), scale


def store_weight_in_fp8(layer: nn.Module) -> None:
    """Keep a CastLinear's or CastConv3d's weight as scaled fp8 (``quantize_weight``); fp8 weights stay as they are."""
    if layer.weight.dtype != FP8:
        values, layer.weight_scale = quantize_weight(layer.weight)
        layer.weight = nn.Parameter(values, requires_grad=False)


class CastLinear(nn.Linear):
    """nn.Linear that computes in the input's dtype whatever dtype its weight is stored in."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None)  # scaled fp8 only: [] or [out, 1] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, real_weight(self, x.dtype), bias)


@dataclass(frozen=True)
class Fp8Input:
    """A GEMM input quantized once for several Fp8Linear layers that read it (attention's q, k and v)."""

    values: torch.Tensor        # [tokens, in] float8 e4m3fn
    scale: torch.Tensor         # [tokens, 1] fp32
    leading_shape: torch.Size   # the input's shape without its last dim

    @classmethod
    def of(cls, x: torch.Tensor, fused: bool | None = None) -> "Fp8Input":
        """fused: quantize in one compiled kernel; default on CUDA with Triton installed, outside compiled code
        (inside it, inductor fuses the quantization into the kernel that makes x). Eagerly, quantize_fp8 is about
        four passes over x: at 1080p that would cost about as much as the fp8 GEMMs save."""
        if x.dtype != torch.bfloat16:
            raise ValueError(f"fp8 matmul takes bf16 inputs, got {x.dtype}: load the model with compute dtype bf16")
        if fused is None:
            fused = x.is_cuda and not torch.compiler.is_compiling() and _has_triton()
        rows = x.reshape(-1, x.shape[-1])
        values, scale = _compiled_quantize()(rows) if fused else quantize_fp8(rows, torch.float32)
        return cls(values, scale, x.shape[:-1])


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8(rows, torch.float32)


@functools.cache
def _has_triton() -> bool:
    """torch.compile's CUDA backend needs Triton (often missing on Windows installs): without it, quantize eagerly."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _compiled_quantize():
    """One compiled function for every token count (dynamic shapes: low/high resolution, text, chunk sizes).
    emulate_precision_casts: round to bf16 where the eager code does, so both give the same bits (tested)."""
    log.info("fp8 matmul: quantizing GEMM inputs with a compiled kernel (compiled once, on its first calls)")
    return torch.compile(_quantize_rows, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def shared_input(x: "torch.Tensor | Fp8Input", layer: nn.Module) -> "torch.Tensor | Fp8Input":
    """x quantized once if ``layer`` (and its siblings reading x) multiply in fp8, else x unchanged."""
    return Fp8Input.of(x) if isinstance(layer, Fp8Linear) and isinstance(x, torch.Tensor) else x


class Fp8Linear(nn.Module):
    """A linear layer that multiplies in fp8: ``torch._scaled_mm`` on float8 e4m3 operands, bf16 out.

    The weight is quantized once, one scale per output channel (absmax / 448); each call quantizes its input the
    same way per token (or takes an ``Fp8Input`` quantized once for several layers). fp8 tensor cores (Hopper,
    Ada, Blackwell) run such a GEMM at about twice the bf16 rate; the price is the rounding of both operands to 3
    mantissa bits (benchmarks/quality_delta.py measures it on x0). Eagerly, each quantization is a few extra
    passes over the input; compiled blocks fuse it into the kernel that produces the input. A weight already
    stored in e4m3fn (an fp8 file, raw or scaled) is used as it is, with its scales (unit ones for a raw cast), so
    this adds no rounding to it.
    Inference only: ``_scaled_mm`` has no backward. Inputs must be bf16 (the only output type of row-wise scaled
    GEMMs on CUDA).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)              # [out, in] float8 e4m3fn
        self.register_buffer("weight_scale", weight_scale)  # [1, out] fp32: real weight = weight * scale (per row)
        self.register_buffer("bias", bias)                  # [out] or None

    @classmethod
    def from_linear(cls, linear: CastLinear) -> "Fp8Linear":
        weight = linear.weight.detach()
        if weight.dtype == FP8:  # as stored: raw (unit scales) or scaled (one scale, or one per row)
            stored = getattr(linear, "weight_scale", None)
            stored = torch.ones((), device=weight.device) if stored is None else stored.float()
            values, scale = weight, stored.expand(weight.shape[0], 1)
        else:
            values, scale = quantize_weight(weight)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        return cls(values.contiguous(), scale.reshape(1, -1).contiguous(), bias)

    def forward(self, x: "torch.Tensor | Fp8Input") -> torch.Tensor:
        x = shared_input(x, self)
        out = torch._scaled_mm(x.values, self.weight.t(), scale_a=x.scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias
        return out.unflatten(0, x.leading_shape)


def check_fp8_matmul(device: torch.device) -> None:
    """Raise ValueError unless this device multiplies fp8 with a scale per row, as Fp8Linear does (CUDA: compute
    capability 8.9 or newer; the CPU: PyTorch 2.13 can, 2.11 takes only one scale per tensor)."""
    ones = torch.ones(16, 16, device=device, dtype=FP8)
    unit = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=unit, scale_b=unit.t(), out_dtype=torch.bfloat16)
    except RuntimeError as exc:
        needs = (f"PyTorch {torch.__version__} multiplies fp8 on the CPU with one scale per tensor only; PyTorch "
                 "2.13 or a CUDA GPU with fp8 tensor cores runs it" if torch.device(device).type == "cpu" else
                 "it needs fp8 tensor cores (Ada, Hopper or newer)")
        raise ValueError(f"fp8 matmul does not run on {device} ({needs}; torch said: {str(exc).splitlines()[0]}); "
                         "keep the bf16 matmuls (fp8 storage alone still halves the weights' memory)") from exc


class CastConv3d(nn.Conv3d):
    """nn.Conv3d that computes in the input's dtype (used for the patch embedding)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None)  # scaled fp8 only: [] or [out, 1] fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, real_weight(self, x.dtype), bias)


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
