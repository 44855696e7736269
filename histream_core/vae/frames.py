"""Conversions between the VAE's frame layout and ComfyUI's IMAGE layout.

VAE frames: [B, 3, T, H, W], RGB in [-1, 1]. ComfyUI IMAGE: [N, H, W, 3] float in [0, 1], one row per frame.
"""

from __future__ import annotations

import torch


def frames_to_images(frames: torch.Tensor) -> torch.Tensor:
    """VAE frames [B, 3, T, H, W] in [-1, 1] -> ComfyUI IMAGE [B*T, H, W, 3] float32 in [0, 1] (video-major)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"expected VAE frames [B, 3, T, H, W], got shape {tuple(frames.shape)}")
    images = (frames.float().clamp(-1.0, 1.0) + 1.0) / 2.0
    return images.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[3:], 3)


class NonFiniteFrames(ValueError):
    """Decoded frames came out NaN or infinite: they would be written as black, so the decode stops instead."""


def check_finite_frames(frames: torch.Tensor, chunk: int) -> torch.Tensor:
    """Return ``frames`` if every value is finite, else raise :class:`NonFiniteFrames` (``chunk`` counts from 1)."""
    if not bool(torch.isfinite(frames).all()):
        raise NonFiniteFrames(f"the decoded frames of chunk {chunk} are NaN/inf: check that the decoder's file (the "
                              "VAE, or the tiny decoder if one is used) holds finite weights; with fp16, try bf16 or "
                              "fp32 (fp16 can overflow in the VAE)")
    return frames


def images_to_frames(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in [0, 1] -> VAE frames [1, 3, N, H, W] in [-1, 1] (one video of N frames)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected ComfyUI IMAGE [N, H, W, 3], got shape {tuple(images.shape)}")
    return (images.float() * 2.0 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)


__all__ = ["frames_to_images", "images_to_frames", "NonFiniteFrames", "check_finite_frames"]
