"""Wan2.1 causal 3D VAE: streaming encode/decode (cache in, cache out), spatial tiling, latent previews; a TAEHV-class
tiny decoder (taew2_1) as the fast alternative.

Layouts: frames [B, 3, T, H, W] in [-1, 1]; raw latents [B, 16, T_latent, H/8, W/8] (ComfyUI LATENT);
``T = 1 + 4 * (T_latent - 1)``. See :mod:`.latent_format` for normalization and :mod:`.stream` for the contract.
"""

from .checkpoints import VAECheckpointError, load_vae, vae_from_state_dict, wan_state_dict_from_diffusers
from .config import WanVAEConfig
from .frames import NonFiniteFrames, check_finite_frames, frames_to_images, images_to_frames
from .latent_format import (LATENT_RGB_BIAS, LATENT_RGB_FACTORS, LATENTS_MEAN, LATENTS_STD, denormalize, normalize,
                            rgb_factors)
from .model import WanVAE
from .preview import latent_preview
from .stream import ChunkDecoder, StreamState
from .tiling import TiledDecoder, TiledState, tile_spans
from .tiny import TinyWanDecoder, load_tiny_decoder

__all__ = [
    "WanVAE", "WanVAEConfig", "StreamState", "ChunkDecoder", "TiledDecoder", "TiledState", "tile_spans",
    "load_vae", "vae_from_state_dict", "VAECheckpointError", "wan_state_dict_from_diffusers",
    "normalize", "denormalize", "rgb_factors", "LATENTS_MEAN", "LATENTS_STD", "LATENT_RGB_FACTORS", "LATENT_RGB_BIAS",
    "latent_preview", "frames_to_images", "images_to_frames", "NonFiniteFrames", "check_finite_frames",
    "TinyWanDecoder", "load_tiny_decoder",
]
