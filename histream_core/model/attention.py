"""One attention function behind which the backends live.

Layout everywhere: q, k, v  # [B, L, heads, head_dim]; output  # [B, Lq, heads, head_dim].
Softmax scale = logit_scale / sqrt(head_dim): ``logit_scale`` is the HD-inference attention-scale multiplier
(1 = plain attention).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "sdpa_cudnn", "sdpa_flash", "flash_attn", "sage")


class AttentionBackendError(RuntimeError):
    """An attention backend was asked for but cannot run here."""


def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _sdpa_pinned(kernel):
    """torch SDPA restricted to one kernel (cuDNN or flash), to measure or force the fastest on a GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kernel]

    def run(q, k, v, scale):
        with sdpa_kernel(backend):
            return _sdpa(q, k, v, scale)
    return run


@functools.cache
def _flash_attn_func() -> Callable:
    """The installed flash-attn's function: FA3's interface, FA4 (CuTeDSL) or FA2, looked up once (a failed import is
    not cached by Python, and the attention runs 60 times per model call)."""
    for module_name in ("flash_attn_interface", "flash_attn.cute", "flash_attn"):
        try:
            return importlib.import_module(module_name).flash_attn_func
        except ImportError:
            continue
    raise AttentionBackendError("attention backend 'flash_attn' asked for but no flash-attn package is installed; "
                                "install flash-attn (2/3) or flash-attn-4, or choose 'sdpa'")


def _flash_attn(q, k, v, scale):
    out = _flash_attn_func()(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v, scale):
    try:
        from sageattention import sageattn
    except ImportError:
        raise AttentionBackendError("attention backend 'sage' asked for but sageattention is not installed; "
                                    "pip install sageattention, or choose 'sdpa'") from None
    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


_IMPLEMENTATIONS: dict[str, Callable] = {"sdpa": _sdpa, "sdpa_cudnn": _sdpa_pinned("cudnn"),
                                          "sdpa_flash": _sdpa_pinned("flash"), "flash_attn": _flash_attn,
                                          "sage": _sage}


def check_backend(name: str) -> None:
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")


def check_backend_runs(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run the backend once on a few zeros, so a missing package or an unsupported device fails before the model
    loads, not minutes into a video."""
    check_backend(name)
    q = torch.zeros(1, 8, 1, 64, device=device, dtype=dtype)  # [B, L, heads, head_dim]
    try:
        attention(q, q, q, name)
    except RuntimeError as exc:  # AttentionBackendError included
        raise AttentionBackendError(f"attention backend {name} cannot run on {device} in {dtype} "
                                    f"({str(exc).splitlines()[0]}); choose sdpa") from exc


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              logit_scale: float = 1.0) -> torch.Tensor:
    """Softmax attention of every query over every key (a chunk sees itself and its cache in full)."""
    scale = logit_scale / math.sqrt(q.shape[-1])
    return _IMPLEMENTATIONS[backend](q, k, v, scale)
