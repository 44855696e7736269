"""Cheap latent -> RGB previews: one linear map per latent pixel, no VAE call (ComfyUI's "Latent2RGB" method)."""

from __future__ import annotations

from typing import Literal

import torch

from .latent_format import LATENT_CHANNELS, normalize, rgb_factors


def latent_preview(latents: torch.Tensor, *, space: Literal["raw", "normalized"],
                   as_uint8: bool = False) -> torch.Tensor:
    """Approximate RGB of each latent frame, at latent resolution.

    ``latents``: [B, 16, T, h, w], either ``"raw"`` (VAE / ComfyUI LATENT space) or ``"normalized"`` (model space,
    what the sampler's x0 is in). Returns [B, T, h, w, 3]: float32 in [0, 1], or uint8 if ``as_uint8``.
    One preview frame stands for the 4 video frames of its latent frame; upscale by 8 to match the video size.
    """
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected Wan2.1 latents [B, {LATENT_CHANNELS}, T, h, w], got shape {tuple(latents.shape)}")
    if space not in ("raw", "normalized"):
        raise ValueError(f"space must be 'raw' or 'normalized', got {space!r}")
    x = latents.float()
    if space == "raw":
        x = normalize(x)
    weight, bias = rgb_factors(device=x.device)  # [16, 3], [3]
    rgb = torch.einsum("bcthw,cr->bthwr", x, weight) + bias  # [B, T, h, w, 3], roughly in [-1, 1]
    rgb = ((rgb.clamp(-1.0, 1.0) + 1.0) / 2.0)
    return (rgb * 255.0).round().to(torch.uint8) if as_uint8 else rgb


__all__ = ["latent_preview"]
