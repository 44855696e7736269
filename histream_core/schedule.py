"""Flow-matching schedule as plain functions over numbers and tensors (the schedule itself is data).

Conventions (Wan2.1 / Self-Forcing): timestep t in [0, 1000], sigma = t / 1000,
    x_t = (1 - sigma) * x0 + sigma * eps,   the model predicts v = eps - x0,   so x0 = x_t - sigma * v.
A few-step generator is run at the step list [1000, 750, 500, 250] *warped* through the shifted 1000-step grid,
as Self-Forcing does: grid point s = step/1000 maps to sigma = shift*s / (1 + (shift-1)*s).
"""

from __future__ import annotations

import torch

BASE_STEPS: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)


def shifted_sigma(s: float, shift: float) -> float:
    """Time-shift of a flow-matching sigma: shift*s / (1 + (shift-1)*s). shift=1 is the identity."""
    return shift * s / (1 + (shift - 1) * s)


def warp_timesteps(steps: tuple[float, ...] = BASE_STEPS, shift: float = 5.0) -> tuple[float, ...]:
    """Self-Forcing's warping of a few-step list through the shifted grid.

    shift 5: (1000, 750, 500, 250) -> (1000, 937.5, 833.33, 625.0); shift 7 -> (1000, 954.55, 875.0, 700.0).
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    for t in steps:
        if not 0 < t <= 1000:
            raise ValueError(f"timesteps must lie in (0, 1000], got {t}")
    return tuple(1000.0 * shifted_sigma(t / 1000.0, shift) for t in steps)


def sigma_of(t: float) -> float:
    return t / 1000.0


def x0_from_flow(x_t: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Clean-sample estimate from the model's flow prediction (computed in float64, as Self-Forcing)."""
    return (x_t.double() - sigma_of(t) * v.double()).to(x_t.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """Forward process to timestep t with the given (fresh) noise."""
    sigma = sigma_of(t)
    return (1 - sigma) * x0 + sigma * noise
