"""Shape of the Wan2.1 causal 3D VAE.

The defaults are Wan2.1's (``Wan2.1_VAE.pth`` / ComfyUI's ``wan_2.1_vae.safetensors``). Tests build tiny ones by
lowering ``base_dim``; diffusers' checkpoint converter hard-codes the decoder block layout, so parity tests keep
``dim_mult=(1, 2, 4, 4)`` and ``num_res_blocks=2``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1 VAE hyper-parameters (Wan's names, with ``temperal`` spelled ``temporal``).

    ``temporal_downsample[i]`` says whether encoder stage ``i`` also halves time; the decoder mirrors it.
    Wan2.1 uses no attention inside the stages (``attn_scales=[]``), only in the middle blocks, so there is
    no ``attn_scales`` here.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.dim_mult) < 1 or min(self.dim_mult) < 1:
            raise ValueError(f"WanVAEConfig.dim_mult must be one or more positive ints, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample needs one flag per resampling stage "
                f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        # Every decoder stage but the last upsamples with a conv to dim // 2 channels, which the next stage reads.
        odd = [self.base_dim * m for m in self.dim_mult[1:] if (self.base_dim * m) % 2]
        if odd:
            raise ValueError(f"WanVAEConfig: decoder upsampling halves the channels, so base_dim * dim_mult must be "
                             f"even for all but the first stage; got odd widths {odd} (pick an even base_dim)")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first one (4 for Wan2.1): ``T = 1 + factor * (T_latent - 1)``."""
        return 2 ** sum(self.temporal_downsample)


__all__ = ["WanVAEConfig"]
