"""The streaming contract shared by every chunk decoder (the Wan VAE now, a TAEHV-class decoder later).

A decoder is stateless; the caller owns one state per video and threads it through the calls::

    state = decoder.initial_state()
    for latents in chunks:                                # raw latents [B, 16, T_chunk, H/8, W/8]
        frames, state = decoder.decode_chunk(latents, state)  # frames [B, 3, T_frames, H, W] in [-1, 1]

Feeding the chunks of a video one after another gives exactly the frames of decoding the whole video at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, TypeVar

import torch

StateT = TypeVar("StateT")


class ChunkDecoder(Protocol[StateT]):
    """Decodes a video's latents chunk by chunk, carrying an explicit state between chunks.

    ``decode_chunk`` takes raw latents [B, 16, T, h, w] (the first chunk's first frame is the video's first
    latent frame) and returns frames [B, 3, T', 8h, 8w] in [-1, 1] with the new state; it never modifies the
    state it was given.
    """

    def initial_state(self) -> StateT: ...

    def decode_chunk(self, latents: torch.Tensor, state: StateT) -> tuple[torch.Tensor, StateT]: ...

    def decode_stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The frames of each chunk in turn, the decoder owning the state (it may free caches earlier)."""
        ...


@dataclass(frozen=True)
class StreamState:
    """What a streaming encode or decode of the Wan VAE carries from one chunk to the next.

    ``caches`` holds, per temporal layer and in call order, the last input frames that layer needs as history
    (``None`` before the first chunk; an entry is ``None`` while its layer has no history yet). ``frames_in``
    counts the input frames consumed so far (latent frames when decoding, video frames when encoding);
    ``geometry`` is the (batch, channels, height, width) of the input, fixed for the whole stream.
    """

    caches: tuple[torch.Tensor | None, ...] | None = None
    frames_in: int = 0
    geometry: tuple[int, int, int, int] | None = None

    @property
    def started(self) -> bool:
        """Whether the video's first frame has been seen (Wan treats that frame specially)."""
        return self.frames_in > 0

    def advanced(self, caches: tuple[torch.Tensor | None, ...] | None, x: torch.Tensor) -> "StreamState":
        """The state after ``x`` # [B, C, T, H, W] went through: the new caches, T more frames, the stream's
        geometry."""
        return StreamState(caches, self.frames_in + x.shape[2], (x.shape[0], x.shape[1], x.shape[3], x.shape[4]))

    def check_input(self, x: torch.Tensor, what: str) -> None:
        """Raise a ValueError if ``x`` [B, C, T, H, W] cannot continue this stream."""
        if x.ndim != 5 or x.shape[2] < 1:
            raise ValueError(f"{what} must be [B, C, T, H, W] with T >= 1, got shape {tuple(x.shape)}")
        geometry = (x.shape[0], x.shape[1], x.shape[3], x.shape[4])
        if self.geometry is not None and geometry != self.geometry:
            raise ValueError(f"{what} with (batch, channels, height, width) = {geometry} cannot continue a stream "
                             f"started with {self.geometry}; start each video (and each of encode/decode) "
                             "from initial_state()")


__all__ = ["ChunkDecoder", "StreamState"]
