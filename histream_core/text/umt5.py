"""The umT5-XXL encoder, Wan2.1's text encoder: T5 v1.1 with its own relative position bias in every layer.

Math (the same as transformers' ``UMT5EncoderModel`` and Wan's ``wan/modules/t5.py``), no biases anywhere:
    x = token_embedding(ids)                                      # [B, L, dim]
    per block l:  x = x + attn_l(norm1(x), pos_bias_l + mask)     # pre-norm
                  x = x + ffn_l(norm2(x))
    out = norm(x), padding positions zeroed
    attn:  softmax(q k^T + bias) v, with NO 1/sqrt(head_dim) factor (T5 folds it into the init of q)
    bias:  layer l's own [buckets, heads] table indexed by the bucketed distance key - query (umT5; T5 v1.1 shares
           layer 0's table across layers); bidirectional buckets: half per direction, half of those exact
    ffn:   fc2(gelu_tanh(gate(x)) * fc1(x))                       (gated GELU, tanh approximation)
    norm:  T5 RMSNorm, x / rms(x) * weight, no mean subtraction, no bias
Module names follow Wan's t5.py (``blocks.0.attn.q``, ``blocks.0.ffn.gate.0``, ``blocks.0.pos_embedding.embedding``),
so ``models_t5_umt5-xxl-enc-bf16.pth`` loads as is; ``weights.py`` renames the other layouts.

Precision: the residual stream and every norm run in fp32 whatever the weight dtype (T5's activations grow large
enough to overflow fp16); the matmuls run in the weight dtype. In fp16, matmul outputs are clamped to the finite
range before they join the residual, as transformers and Wan clamp their fp16 activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a umT5 encoder; the defaults are umT5-XXL as Wan2.1 uses it (5.7 B parameters)."""

    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    head_dim: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128  # distances at or beyond this share the last bucket of their direction
    eps: float = 1e-6
    text_len: int = 512  # most tokens per prompt, EOS included (Wan's text_len); longer prompts are cut

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "ffn_dim", "num_heads", "head_dim", "num_layers", "text_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UMT5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"UMT5Config.num_buckets must be even and at least 4 (half per direction, half of "
                             f"those exact), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"UMT5Config.max_distance ({self.max_distance}) must exceed the exact range "
                             f"num_buckets // 4 = {self.num_buckets // 4}; umT5 uses 128 with 32 buckets")
        if not self.eps > 0:
            raise ValueError(f"UMT5Config.eps must be positive, got {self.eps}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def with_(self, **changes) -> "UMT5Config":
        return replace(self, **changes)


UMT5_PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(),
    # CPU tests in milliseconds. Files do not store max_distance, so it stays 128; with 8 buckets, every bucket is
    # used by 17 tokens (distances 0 and 1 exact, 2-15 log-spaced, 16+ the last).
    "tiny": UMT5Config(vocab_size=96, dim=32, ffn_dim=48, num_heads=4, head_dim=8, num_layers=2, num_buckets=8,
                       text_len=16),
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Bidirectional T5 buckets of (key - query) for a sequence attending to itself # [length (q), length (k)].

    Keys after the query use the upper half of the buckets. Within a half, distances below a quarter of all buckets
    get their own bucket; larger ones share log-spaced buckets up to ``max_distance``, and all beyond it the last.
    """
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]  # [q, k]
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    # Same float ops in the same order as Mesh TensorFlow / transformers, so the buckets match bit for bit.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_ratio.to(torch.long)).clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < exact, distance, far)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Clamp fp16 activations to the finite range (inf -> max - 1000, as transformers and Wan do); else identity."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square, no mean subtraction, no bias; fp32 in and out."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class RelativePositionBias(nn.Module):
    """One layer's learned bias per (bucket, head)."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        # [q, k] -> [1, heads, q, k]
        return self.embedding(buckets).permute(2, 0, 1)[None]


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x # [B, L, dim]; bias # [B or 1, heads, L, L], already in x's dtype with the padding mask folded in."""
        b, length, _ = x.shape
        q, k, v = (proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, L, head_dim]
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(head_dim)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class GatedGeluFFN(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        # A one-element Sequential only so that the parameter is named "gate.0.weight", as in Wan's checkpoint.
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim, bias=False))
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_fp16_clamp(F.gelu(self.gate(x), approximate="tanh") * self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedGeluFFN(cfg)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """x # [B, L, dim] fp32 residual; buckets # [L, L]; padding # [B, 1, 1, L] bool, True on padded keys."""
        dtype = self.attn.q.weight.dtype
        bias = self.pos_embedding(buckets).to(dtype)
        if padding is not None:
            bias = bias.masked_fill(padding, torch.finfo(dtype).min)
        x = x + _fp16_clamp(self.attn(self.norm1(x).to(dtype), bias)).float()
        return x + _fp16_clamp(self.ffn(self.norm2(x).to(dtype))).float()


class UMT5Encoder(nn.Module):
    """The encoder stack alone (no decoder, no LM head), as Wan2.1 uses it."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids # [B, L] (mask # [B, L], nonzero on real tokens) into states # [B, L, dim], fp32.

        Padded positions are masked as keys and zeroed in the output; real tokens' states do not depend on how much
        padding follows them (relative positions, masked keys), so a prompt encodes the same alone or in a batch.
        """
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [batch, tokens], got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the ids' shape {tuple(ids.shape)}")
        keep = None if mask is None else mask.to(device=ids.device, dtype=torch.bool)
        x = self.token_embedding(ids).float()
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_distance, ids.device)
        padding = None if keep is None else ~keep[:, None, None, :]
        for block in self.blocks:
            x = block(x, buckets, padding)
        x = self.norm(x)
        return x if keep is None else x.masked_fill(~keep[..., None], 0.0)


__all__ = ["UMT5Config", "UMT5_PRESETS", "UMT5Encoder", "relative_position_buckets"]
