"""3-axis rotary position embedding of Wan2.1, stateless, with a temporal offset and NTK base scaling.

Formulas (head dim d, split into time/height/width parts d_t = d-4*(d//6), d_h = d_w = 2*(d//6)):
    for axis a with base theta_a = rope_theta * factor_a and channel pair j < d_a/2:
        omega_{a,j} = theta_a ** (-2j / d_a)
    a token at (frame f, row y, column x) rotates pair j of axis a by angle pos_a * omega_{a,j},
    pos = (frame_start + f, y, x).
With factors (1, 1, 1) this is exactly Wan's ``rope_params``/``rope_apply`` (float64 angles).
NTK scaling (CineScale's convention, used by HiStream's "HD tech"): the spatial factors multiply the base, so
low frequencies stretch to cover a larger grid while the highest frequency is unchanged; time is left alone.
"""

from __future__ import annotations

import torch


def axis_frequencies(axis_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """omega_j = theta ** (-2j / axis_dim) for j < axis_dim/2, float64.  # [axis_dim/2]"""
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
    return theta ** (-exponents)


def rope_angles(
    grid: tuple[int, int, int],
    split: tuple[int, int, int],
    frame_start: int = 0,
    theta: float = 10000.0,
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles for every token of a (frames, rows, cols) token grid, row-major in (f, y, x).

    Returns float64 angles  # [F*H*W, head_dim/2]
    """
    frames, rows, cols = grid
    positions = (
        torch.arange(frame_start, frame_start + frames, dtype=torch.float64, device=device),
        torch.arange(rows, dtype=torch.float64, device=device),
        torch.arange(cols, dtype=torch.float64, device=device),
    )
    per_axis = [torch.outer(pos, axis_frequencies(d, theta * f, device))
                for pos, d, f in zip(positions, split, factors)]
    t_ang, h_ang, w_ang = per_axis  # [F, d_t/2], [H, d_h/2], [W, d_w/2]
    angles = torch.cat([
        t_ang[:, None, None, :].expand(frames, rows, cols, -1),
        h_ang[None, :, None, :].expand(frames, rows, cols, -1),
        w_ang[None, None, :, :].expand(frames, rows, cols, -1),
    ], dim=-1)
    return angles.reshape(frames * rows * cols, -1)


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles, shaped to broadcast over [B, L, heads, head_dim/2]."""
    return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (2j, 2j+1) of x by the given angles, computing in float32.

    x  # [B, L, heads, head_dim];  cos, sin  # [1, L, 1, head_dim/2]
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def shift_time(x: torch.Tensor, delta_frames: int, split: tuple[int, int, int], theta: float = 10000.0,
               time_factor: float = 1.0) -> torch.Tensor:
    """Move already-rotated keys ``delta_frames`` along the time axis (rotations compose additively).

    Used to re-index cached keys into window positions without recomputing them.  x  # [B, L, heads, head_dim]
    """
    d_t = split[0]
    angle = delta_frames * axis_frequencies(d_t, theta * time_factor, x.device)  # [d_t/2]
    cos = torch.cat([angle.cos(), angle.new_ones((x.shape[-1] - d_t) // 2)]).float()
    sin = torch.cat([angle.sin(), angle.new_zeros((x.shape[-1] - d_t) // 2)]).float()
    return apply_rope(x, cos[None, None, None, :], sin[None, None, None, :])
