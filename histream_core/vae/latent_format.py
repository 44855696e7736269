"""Wan2.1 latent statistics and preview factors: the one place these numbers live.

Two latent spaces meet in this project:

* **raw**: what the VAE encoder produces and the decoder consumes; what ComfyUI's ``LATENT["samples"]`` holds.
* **normalized** (model space): what the DiT denoises; ``(raw - mean) / std`` per channel.

The values are Wan2.1's (``wan/modules/vae.py``), identical to ComfyUI's ``comfy.latent_formats.Wan21``
(``process_in`` = :func:`normalize` with ``scale_factor`` 1.0, ``process_out`` = :func:`denormalize`) and to
diffusers' ``AutoencoderKLWan`` config ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

import torch

LATENT_CHANNELS = 16

# Per-channel mean and std of raw Wan2.1 latents.
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Linear latent -> RGB approximation (ComfyUI's Wan21.latent_rgb_factors / latent_rgb_factors_bias), applied to
# NORMALIZED latents (ComfyUI previews the sampler's x0, which is in model space). Output is roughly in [-1, 1].
LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    # R        G        B
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS: tuple[float, float, float] = (-0.1835, -0.0868, -0.3360)


def _channel_stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std shaped [1, 16, 1, 1, 1] on the device and in the dtype of ``like``."""
    if like.ndim != 5 or like.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"expected Wan2.1 latents [B, {LATENT_CHANNELS}, T, H, W], got shape {tuple(like.shape)}")
    mean = torch.tensor(LATENTS_MEAN, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD, device=like.device, dtype=like.dtype).view(1, -1, 1, 1, 1)
    return mean, std


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> model space: ``(raw - mean) / std``.  # [B, 16, T, H, W] -> same"""
    mean, std = _channel_stats(raw)
    return (raw - mean) / std


def denormalize(norm: torch.Tensor) -> torch.Tensor:
    """Model space -> raw VAE latents: ``norm * std + mean``.  # [B, 16, T, H, W] -> same"""
    mean, std = _channel_stats(norm)
    return norm * std + mean


def rgb_factors(device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The preview factors as tensors: weight [16, 3] and bias [3]."""
    weight = torch.tensor(LATENT_RGB_FACTORS, device=device, dtype=dtype)
    bias = torch.tensor(LATENT_RGB_BIAS, device=device, dtype=dtype)
    return weight, bias


__all__ = [
    "LATENT_CHANNELS", "LATENTS_MEAN", "LATENTS_STD", "LATENT_RGB_FACTORS", "LATENT_RGB_BIAS",
    "normalize", "denormalize", "rgb_factors",
]
