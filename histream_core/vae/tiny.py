"""A TAEHV-class tiny decoder for Wan2.1 latents (the ``taew2_1`` weights): a fast, lower-quality stand-in for the
Wan VAE decode, for previews and drafts. It implements :class:`~.stream.ChunkDecoder`, so it streams chunk by chunk
with the same cache-in/cache-out contract and drops into the pipeline and the decode node.

The architecture is madebyollin's TAEHV decoder, written here from its public description and code: frames are a
batch of images [N*T, C, H, W]; each ``MemBlock`` also sees its own input of the previous frame (its whole temporal
context, so a stream carries one frame per MemBlock); ``TimeGrow`` turns each frame into ``stride`` frames with a 1x1
conv; nearest 2x upsampling between stages. The network reads model-space latents (normalized by Wan's mean/std)
and gives RGB in about [0, 1]; ``decode_chunk`` wraps it to the Wan VAE's interface (raw latents in, [-1, 1] out).
Its first three output frames align it with Wan's causal VAE and are dropped, so T latent frames give 1 + 4(T - 1)
frames like the Wan VAE. Parameter names match ``taew2_1.pth`` /
``taew2_1.safetensors`` (``decoder.N...``); the file's encoder is not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from ..weight_files import TensorEntry, Unusable, check_fit, open_weight_file
from .latent_format import LATENT_CHANNELS, normalize
from .stream import StreamState

EXPECTED_FILE = ("use TAEHV's taew2_1.safetensors or taew2_1.pth (the tiny decoder for Wan2.1 latents; ComfyUI keeps "
                 "such files in models/vae_approx)")
WIDTHS = (256, 128, 64, 64)  # channels of the decoder's stages
TIME_STRIDES = (1, 2, 2)  # frames made from each frame by the TimeGrow of each stage (4 in all, as Wan2.1's VAE)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """tanh(x / 3) * 3: bounds outlying latents smoothly before the first conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over (this frame, the block's input of the previous frame) stacked on channels."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in * 2, n_out), nn.ReLU(inplace=True), _conv(n_out, n_out),
                                  nn.ReLU(inplace=True), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:  # both [N*T, C, H, W]
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TimeGrow(nn.Module):
    """Each frame -> ``stride`` consecutive frames (a 1x1 conv to stride * C channels, read as frames)."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N*T, C, H, W] -> [N*T*stride, C, H, W]
        return self.conv(x).reshape(-1, *x.shape[1:])


class TinyWanDecoder(nn.Module):
    """TAEHV decoder for Wan2.1 latents; see the module docstring. ``decoder`` indices match the weight files.

    ``preview=True`` builds TAEHV's cheap preview variant from the same weights: no time upsampling (one frame per
    latent frame, the last of its four) and only the last stage's 2x spatial upsampling (frames at 2x the latent
    size, e.g. 480x272 for 1080p), at about 1/4 of the full decoder's work (81 frames at 1080p: 13.6 vs 59.8
    TFLOP, FlopCounterMode on the meta device; the Wan VAE's decode is 1,468).
    """

    def __init__(self, preview: bool = False) -> None:
        super().__init__()
        self.preview = preview
        self.frames_to_trim = 0 if preview else 3  # the first full-decoder outputs precede the video's first frame
        layers: list[nn.Module] = [SoftClamp(), _conv(LATENT_CHANNELS, WIDTHS[0]), nn.ReLU(inplace=True)]
        for stage, stride in enumerate(TIME_STRIDES):
            n_f = WIDTHS[stage]
            upscale = 1 if preview and stage < len(TIME_STRIDES) - 1 else 2
            layers += [MemBlock(n_f, n_f), MemBlock(n_f, n_f), MemBlock(n_f, n_f), nn.Upsample(scale_factor=upscale),
                       TimeGrow(n_f, 1 if preview else stride), _conv(n_f, WIDTHS[stage + 1], bias=False)]
        layers += [nn.ReLU(inplace=True), _conv(WIDTHS[-1], 3)]
        self.decoder = nn.Sequential(*layers)

    def initial_state(self) -> StreamState:
        return StreamState()

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, StreamState]:
        """Raw latents [B, 16, T, h, w] -> frames [B, 3, T', 8h, 8w] in [-1, 1] and the new state (as WanVAE)."""
        self._check(latents, state)
        frames, memories = self._run(latents, state.caches, first=not state.started)
        return frames, state.advanced(memories, latents)

    @torch.no_grad()
    def decode_stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        state = self.initial_state()
        for latents in chunks:
            frames, state = self.decode_chunk(latents, state)
            yield frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole video: raw [B, 16, T, h, w] -> frames [B, 3, 1 + 4 * (T - 1), 8h, 8w] in [-1, 1]
        (preview: [B, 3, T, 2h, 2w])."""
        return self.decode_chunk(latents, self.initial_state())[0]

    def _check(self, latents: torch.Tensor, state: StreamState) -> None:
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"latents must be raw Wan2.1 latents [B, {LATENT_CHANNELS}, T, H/8, W/8], got shape "
                             f"{tuple(latents.shape)}")
        state.check_input(latents, "latents")

    def _run(self, latents: torch.Tensor, memories: tuple[torch.Tensor, ...] | None,
             first: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """All frames of the chunk through the decoder together, block after block; each MemBlock's past is the
        previous frame's input (the carried memory for the chunk's first frame, zeros at the video's start)."""
        weight = self.decoder[1].weight
        n = latents.shape[0]
        x = normalize(latents.float()).to(device=weight.device, dtype=weight.dtype)
        h = x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [N*T, C, H, W]
        carried = iter(memories or ())
        new_memories = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = h.unflatten(0, (n, -1))  # [N, T, C, H, W]
                before = next(carried, None)
                before = torch.zeros_like(frames[:, :1]) if before is None else before.unsqueeze(1)
                past = torch.cat([before, frames[:, :-1]], 1).flatten(0, 1)
                new_memories.append(frames[:, -1].clone())
                h = layer(h, past)
            else:
                h = layer(h)
        video = h.unflatten(0, (n, -1)).permute(0, 2, 1, 3, 4)  # [N, 3, T', H, W]
        if first:
            video = video[:, :, self.frames_to_trim:]
        return video.clamp(0, 1).mul(2).sub(1), tuple(new_memories)


def load_tiny_decoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      preview: bool = False) -> TinyWanDecoder:
    """Load the decoder of a TAEHV ``taew2_1`` file (.safetensors, or .pth read with ``weights_only=True``), or with
    ``preview`` its cheap preview variant (see :class:`TinyWanDecoder`).

    Raises ValueError naming the file and what is wrong if it is missing, unreadable or not TAEHV for Wan2.1.
    """
    path = Path(path)

    def error(problem: Unusable) -> ValueError:
        return ValueError(problem.message(path, "a TAEHV tiny decoder", ["TAEHV (decoder.N...)"], EXPECTED_FILE))

    model = TinyWanDecoder(preview)
    expected = model.state_dict()
    with open_weight_file(path, advice=EXPECTED_FILE, error=error) as weights:
        if "decoder.conv1.weight" in weights.entries or "decoder.conv_in.weight" in weights.entries:
            raise error(Unusable("it is the Wan VAE (its decoder's conv1 / conv_in), not the tiny decoder",
                                 "give it as the VAE (CLI: --vae; ComfyUI: Load VAE)"))
        state = {key: entry.load() for key, entry in weights.entries.items() if key.startswith("decoder.")}
    if not state:
        raise error(Unusable(f"it has no 'decoder.' tensors, only {len(weights.entries)} others"))
    for key, tensor in state.items():
        # A TimeGrow stored with a larger stride than built (the file's first stage, or every stage of a preview):
        # keep the channels of the last of its frames, as TAEHV itself does.
        if key in expected and key.endswith(".conv.weight") and tensor.shape[0] > expected[key].shape[0]:
            state[key] = tensor[-expected[key].shape[0]:]
    try:
        check_fit(expected, {key: TensorEntry.of(tensor) for key, tensor in state.items()}, {},
                  model="TAEHV for Wan2.1 (16 latent channels)", float_hint=EXPECTED_FILE)
    except Unusable as problem:
        raise error(problem) from None
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = ["TinyWanDecoder", "load_tiny_decoder"]
