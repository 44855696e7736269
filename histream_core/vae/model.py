"""Wan2.1 causal 3D VAE with streaming encode and decode (cache in, cache out).

Layouts:

* video frames: [B, 3, T, H, W], RGB in [-1, 1]; ``T = 1 + 4 * (T_latent - 1)``, H and W multiples of 8.
* latents: raw (un-normalized) [B, 16, T_latent, H/8, W/8], as in ComfyUI's ``LATENT["samples"]``; see
  :mod:`.latent_format` for the model-space normalization.

Wan runs the decoder one latent frame at a time and the encoder on the first frame, then 4 frames at a time;
each pass continues the causal caches of the previous one. Here a pass is a :class:`~.layers.CausalPass`
and the caches live in a :class:`~.stream.StreamState` the caller owns, so a video can be decoded in chunks
as its latents arrive and the result is the same as decoding it whole.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from .config import WanVAEConfig
from .layers import (AttentionBlock, CausalConv3d, CausalPass, Downsample, RMSNorm, ResidualBlock, Upsample,
                     cudnn_conv3d_unreliable)
from .stream import StreamState

log = logging.getLogger(__name__)


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> posterior moments [B, 2*z, T_latent, H/8, W/8] (before ``conv1``)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                downsamples.append(Downsample(out_dim, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.ModuleList(downsamples)
        width = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(width, images=False), nn.SiLU(inplace=True),
                                  CausalConv3d(width, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, stream: CausalPass) -> torch.Tensor:
        x = self.conv1(x, stream)
        for layer in self.downsamples:
            x = layer(x, stream)
        res_a, attn, res_b = self.middle
        x = res_b(attn(res_a(x, stream)), stream)
        norm, _, conv = self.head  # the SiLU runs inside the norm's silu_into
        return conv.forward_normed([x], norm, stream)


class Decoder3d(nn.Module):
    """Latents [B, z, T_latent, h, w] (after ``conv2``) -> frames [B, 3, T, 8h, 8w] (not clamped)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        upsamples: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                upsamples.append(Upsample(out_dim, temporal=temporal_upsample[i]))
        self.upsamples = nn.ModuleList(upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(inplace=True),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, stream: CausalPass) -> torch.Tensor:
        x = self.conv1(x, stream)
        res_a, attn, res_b = self.middle
        x = res_b(attn(res_a(x, stream)), stream)
        for layer in self.upsamples:
            x = layer(x, stream)
        norm, _, conv = self.head  # the SiLU runs inside the norm's silu_into
        handed = [x]
        del x  # the head's step frees the last stage's output once it has read it
        return conv.forward_normed(handed, norm, stream)


CONV_IMPLS = ("auto", "conv3d", "conv2d")


class WanVAE(nn.Module):
    """The Wan2.1 VAE. Parameter names match ``Wan2.1_VAE.pth`` / ComfyUI's ``wan_2.1_vae.safetensors``.

    ``encoder`` + ``conv1`` (1x1x1, gives mean and log-variance) encode; ``conv2`` (1x1x1) + ``decoder`` decode.
    It implements :class:`~.stream.ChunkDecoder`. Encode and decode run without autograd: the VAE is frozen
    in this project, and streaming with autograd on would keep every chunk's graph alive through the caches.
    """

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or WanVAEConfig()
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(self.config)
        self.decode_layout = torch.contiguous_format
        self.conv_impl = "auto"

    def set_channels_last(self, enabled: bool = True) -> "WanVAE":
        """Decode in channels-last layout (NDHWC activations, channels_last(_3d) conv weights), or back to NCDHW.

        cuDNN runs its convolutions in channels-last form: given NCDHW tensors it converts every input and output,
        and for some shapes falls back to slower kernels. Here the decoder's input is converted once and every
        buffer after it is allocated in the same layout, so no conv converts anything. The frames are the same up
        to the convolution algorithms' float rounding. Returns the VAE.
        """
        formats = {5: torch.channels_last_3d, 4: torch.channels_last} if enabled else {}
        for module in (self.conv2, self.decoder):
            for conv in module.modules():
                if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
                    weight = conv.weight
                    weight.data = weight.data.contiguous(
                        memory_format=formats.get(weight.dim(), torch.contiguous_format))
        self.decode_layout = torch.channels_last_3d if enabled else torch.contiguous_format
        return self

    def set_conv_impl(self, impl: str = "auto") -> "WanVAE":
        """How the causal 3D convolutions run: "conv3d" (PyTorch's), "conv2d" (a sum of conv2d over the kernel's
        time offsets; the same up to rounding; the decode then switches to channels-last layout, see
        :meth:`set_channels_last`, where it reads the frames in place) or "auto" (default): conv2d where cuDNN's
        half-precision 3D convolutions are unreliable (cuDNN 9.8-9.14, see ``layers.cudnn_conv3d_unreliable``),
        conv3d elsewhere. Returns the VAE."""
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.conv_impl = impl
        self.conv_impl = impl
        return self

    def compile_norms(self, enabled: bool = True) -> "WanVAE":
        """Run the decoder's norm + SiLU before each causal conv as one torch.compile'd kernel (or eager again).

        Outside its convolutions the decode is memory-bound, and these norms are over half of the bytes it moves
        (four passes over each activation, fused into one read and one write). The frames are the same up to
        rounding (the kernel rounds once, in fp32). The first decode compiles (a few graphs, dynamic shapes).
        Returns the VAE.
        """
        for module in self.decoder.modules():
            if isinstance(module, RMSNorm):
                module.compiled = enabled
        return self

    def initial_state(self) -> StreamState:
        """The state to start a video's encode or decode from (one per video and direction)."""
        return StreamState()

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: StreamState, frames_per_pass: int | None = 1,
                     before_pass: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, StreamState]:
        """Decode the next latent frames of a video.

        ``latents``: raw [B, z, T, h, w]. Returns frames [B, 3, T', 8h, 8w] in [-1, 1] (the model's dtype and
        device) and the new state; ``T' = 1 + 4 * (T - 1)`` for the video's first chunk and ``4 * T`` after it.
        ``frames_per_pass`` latent frames go through the network together (``None``: the whole chunk). Wan uses
        1, the least memory (a 1080p pass is ~4 full-resolution frames); more can be faster at low resolution.
        The output is the same up to float rounding. The given state is left as it was (so it keeps its caches
        alive during the call); :meth:`decode_stream` owns its state and needs one set of caches less.
        ``before_pass(index, passes)`` is called before each pass (to report progress, or to stop by raising).
        """
        self.check_latents(latents, state, frames_per_pass)
        box = [state.caches]
        out = self.decode_passes(latents, box, state.started, frames_per_pass, before_pass)
        return out, state.advanced(box[0], latents)

    @torch.no_grad()
    def decode_stream(self, chunks: Iterable[torch.Tensor], frames_per_pass: int | None = 1
                      ) -> Iterator[torch.Tensor]:
        """Decode a video's latent chunks as they arrive, yielding each chunk's frames (as :meth:`decode_chunk`
        threaded through a state, bit for bit). The stream owns its causal caches, so each is freed as soon as the
        next pass has used it: one set of caches is resident (about 9 GiB at 1080p in bf16) instead of two."""
        meta, box = self.initial_state(), [None]
        for latents in chunks:
            self.check_latents(latents, meta, frames_per_pass)
            yield self.decode_passes(latents, box, meta.started, frames_per_pass)
            meta = meta.advanced(None, latents)

    def check_latents(self, latents: torch.Tensor, state: StreamState, frames_per_pass: int | None) -> None:
        """Refuse latents that are not raw Wan latents or cannot continue ``state``'s stream, or a bad pass size."""
        z = self.config.z_dim
        if latents.ndim != 5 or latents.shape[1] != z:
            raise ValueError(f"latents must be raw Wan latents [B, {z}, T, H/8, W/8], got shape {tuple(latents.shape)}")
        state.check_input(latents, "latents")
        if frames_per_pass is not None and frames_per_pass < 1:
            raise ValueError(f"frames_per_pass must be >= 1 or None, got {frames_per_pass}")

    def decode_passes(self, latents: torch.Tensor, box: list, started: bool, frames_per_pass: int | None,
                       before_pass: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run the decoder pass by pass (the streams' common core, also :class:`~.tiling.TiledDecoder`'s, tile by
        tile). ``box`` holds the caches: its content is handed to each pass and replaced by the pass's result, so
        whatever the caller does not hold elsewhere is freed as it is consumed."""
        weight = self.conv2.weight
        x = latents.to(device=weight.device, dtype=weight.dtype)
        x = self.conv2(x.contiguous(memory_format=self._decode_layout_for(x)))
        frames, passes = [], _passes(x.shape[2], first_alone=not started, size=frames_per_pass)
        for index, (start, stop) in enumerate(passes):
            if before_pass is not None:
                before_pass(index, len(passes))
            stream = CausalPass(box.pop(), first_frame=not started and start == 0)
            frames.append(self.decoder(x[:, :, start:stop], stream))
            box.append(stream.result())
        return torch.cat(frames, dim=2).clamp_(-1.0, 1.0)

    def _decode_layout_for(self, x: torch.Tensor) -> torch.memory_format:
        """The decode's layout; the convs running as conv2d switch it to channels-last for good (they read the
        frames in place only in that layout)."""
        unreliable = self.conv_impl == "auto" and cudnn_conv3d_unreliable(x.device, x.dtype)
        if (self.conv_impl == "conv2d" or unreliable) and self.decode_layout != torch.channels_last_3d:
            if unreliable:
                log.info("cuDNN %s has unreliable half-precision 3D convolutions (fixed in 9.15): the VAE runs its "
                         "causal convs as conv2d, in channels-last layout", torch.backends.cudnn.version())
            self.set_channels_last(True)
        return self.decode_layout

    def decode(self, latents: torch.Tensor, frames_per_pass: int | None = 1) -> torch.Tensor:
        """Decode a whole video: raw [B, z, T, h, w] -> frames [B, 3, 1 + 4 * (T - 1), 8h, 8w] in [-1, 1]."""
        return self.decode_chunk(latents, self.initial_state(), frames_per_pass)[0]

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Encode the next frames of a video to raw latents (the posterior mean, as ComfyUI's VAE encode).

        ``video``: [B, 3, T, H, W] in [-1, 1], H and W multiples of 8. The first chunk must hold ``1 + 4k``
        frames and later ones ``4k`` (k >= 1), because every latent frame after the first covers 4 video frames.
        Returns raw latents [B, z, T_latent, H/8, W/8] and the new state.
        """
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] in [-1, 1], got shape {tuple(video.shape)}")
        state.check_input(video, "video")
        t, h, w = video.shape[2:]
        step, sf = cfg.temporal_factor, cfg.spatial_factor
        if h % sf or w % sf:
            raise ValueError(f"video height and width must be multiples of {sf}, got {h}x{w}; crop or resize it")
        misaligned = t % step if state.started else (t - 1) % step
        if misaligned:
            raise ValueError(f"cannot encode a chunk of {t} frames here: the first chunk of a video needs 1 + {step}k "
                             f"frames and later chunks {step}k frames (k >= 1); {state.frames_in} frames seen so far")
        weight = self.conv2.weight
        x = video.to(device=weight.device, dtype=weight.dtype)
        caches, moments = state.caches, []
        for start, stop in _passes(t, first_alone=not state.started, size=step):
            stream, caches = CausalPass(caches, first_frame=not state.started and start == 0), None
            moments.append(self.encoder(x[:, :, start:stop], stream))
            caches = stream.result()
        mean = self.conv1(torch.cat(moments, dim=2))[:, :cfg.z_dim]
        return mean, state.advanced(caches, video)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a whole video [B, 3, 1 + 4k, H, W] in [-1, 1] to raw latents [B, z, 1 + k, H/8, W/8]."""
        return self.encode_chunk(video, self.initial_state())[0]


def _passes(length: int, first_alone: bool, size: int | None) -> list[tuple[int, int]]:
    """Split ``range(length)`` into (start, stop) passes: the first frame alone if asked, then ``size`` at a time."""
    bounds, start = [], 0
    if first_alone:
        bounds.append((0, 1))
        start = 1
    step = size or max(length - start, 1)
    bounds += [(s, min(s + step, length)) for s in range(start, length, step)]
    return bounds


__all__ = ["WanVAE", "Encoder3d", "Decoder3d"]
