"""Spatially tiled streaming decode, for GPUs that cannot hold a full-resolution (e.g. 1080p) decode pass.

The latent frame is cut into overlapping tiles; each tile is decoded on its own with its own causal state, so the
tiled decoder still streams chunk by chunk. Decoded tiles are blended with linear ramps across each overlap
(weights normalized to sum to one), which hides the seams that zero padding at the tile borders would leave.
Tiling is an approximation: the VAE's middle attention and its convolutions see only their tile. The error
against an untiled decode shrinks as the overlap grows; one tile covering the frame gives the untiled result.

Tiling bounds the activation memory of a pass, but the causal caches a stream keeps between chunks add up over
the tiles to about the untiled size (2 frames per temporal conv: ~9.2 GiB at 1920x1088 in bf16, ~1.8 GiB at
832x480). So :meth:`TiledDecoder.decode_stream` decodes tile after tile over a segment of many chunks and parks
each tile's caches in host memory between segments: the GPU holds one tile's caches and activations plus the
segment's frames. A whole-video :meth:`TiledDecoder.decode` is one segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from .model import WanVAE
from .stream import StreamState


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``range(length)`` with (start, stop) spans of ``tile`` (fewer if ``length`` is shorter), spaced evenly
    with at least ``overlap`` shared positions between neighbours."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(s, s + tile) for s in starts]


def _blend_ramp(spans: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """1D blending weights (in pixels) of span ``index``: 1 inside, rising/falling linearly across overlaps."""
    start, stop = spans[index]
    weight = torch.ones((stop - start) * scale)
    if index > 0:
        shared = (spans[index - 1][1] - start) * scale
        rise = torch.arange(1, shared + 1, dtype=torch.float32) / (shared + 1)
        weight[:shared] = torch.minimum(weight[:shared], rise)
    if index < len(spans) - 1:
        shared = (stop - spans[index + 1][0]) * scale
        fall = torch.arange(shared, 0, -1, dtype=torch.float32) / (shared + 1)
        weight[weight.numel() - shared:] = torch.minimum(weight[weight.numel() - shared:], fall)
    return weight


@dataclass(frozen=True)
class TiledState:
    """One :class:`StreamState` per tile (row-major), created on the first chunk."""

    tiles: tuple[StreamState, ...] = ()


class _Parked:
    """A tensor waiting in host memory for its next use on ``device`` (of a meta tensor only the shape is kept)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.device, self.shape, self.dtype = t.device, t.shape, t.dtype
        self.host = None
        if t.device.type != "meta":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self.host.copy_(t)

    def back(self) -> torch.Tensor:
        if self.host is None:
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.host.to(self.device, non_blocking=True)


def _park(caches: tuple[torch.Tensor | None, ...]) -> tuple[_Parked | None, ...]:
    return tuple(None if c is None else _Parked(c) for c in caches)


def _unpark(caches: tuple[_Parked | None, ...] | None) -> tuple[torch.Tensor | None, ...] | None:
    return None if caches is None else tuple(None if c is None else c.back() for c in caches)


MIN_TILE = 4  # latent pixels; a quarter of it is the overlap
SMALLEST_USEFUL_TILE = 8  # latent pixels (64 px): the CLI's and the node's floor; smaller tiles lose too much
                          # context at their edges (MIN_TILE stays the library's, for tests on tiny latents)


class TiledDecoder:
    """Decode with a :class:`WanVAE` tile by tile; implements :class:`~.stream.ChunkDecoder`.

    ``tile`` and ``overlap`` are in latent pixels (x8 for video pixels): e.g. tile 64 / overlap 16 decodes 512 px
    tiles sharing at least 128 px. ``frames_per_pass`` is passed to :meth:`WanVAE.decode_chunk`.
    ``segment_frames``: :meth:`decode_stream` gathers chunks until it holds this many latent frames (21 = 81 video
    frames; at 1080p the segment's frames take ~2 GB in fp32 while they are blended) and decodes them tile by tile.
    ``before_pass(done, chunks)`` is called before each decoder pass of each tile, with the fraction ``done`` of the
    work on the current ``chunks`` chunks (a segment, in a stream) already done: a segment's frames come out only
    after all its tiles, so this is where a caller reports progress or stops a long decode (by raising).
    """

    def __init__(self, vae: WanVAE, tile: int = 64, overlap: int = 16, frames_per_pass: int | None = 1,
                 segment_frames: int = 21, before_pass: Callable[[float, int], None] | None = None) -> None:
        if tile < 1:
            raise ValueError(f"tile must be >= 1 latent pixel, got {tile}")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1 latent frame, got {segment_frames}")
        self.vae = vae
        self.tile = tile
        self.overlap = overlap
        self.frames_per_pass = frames_per_pass
        self.segment_frames = segment_frames
        self.before_pass = before_pass

    @classmethod
    def overlapping_by_a_quarter(cls, vae: WanVAE, tile: int) -> "TiledDecoder":
        """Tiles of ``tile`` latent pixels that overlap by a quarter of a tile: the command line's ``--tile``."""
        if tile < MIN_TILE:
            raise ValueError(f"tile must be at least {MIN_TILE} latent pixels ({8 * MIN_TILE} px), got {tile}; "
                             "64 (512 px) decodes 1080p in about 4 GiB")
        return cls(vae, tile=tile, overlap=tile // 4)

    def initial_state(self) -> TiledState:
        return TiledState()

    def decode_chunk(self, latents: torch.Tensor, state: TiledState) -> tuple[torch.Tensor, TiledState]:
        """Raw latents [B, z, T, h, w] -> frames [B, 3, T', 8h, 8w] in [-1, 1] and the new state (as WanVAE)."""
        rows, cols = self._spans(latents)
        tiles = state.tiles or (self.vae.initial_state(),) * (len(rows) * len(cols))
        if len(tiles) != len(rows) * len(cols):
            raise ValueError(f"latents of size {tuple(latents.shape[3:])} do not fit this tiled stream's "
                             f"{len(tiles)} tiles; start each video from initial_state()")
        new_tiles: list[StreamState] = []

        def decode_tile(k: int, tile: torch.Tensor, report) -> torch.Tensor:
            frames, tile_state = self.vae.decode_chunk(tile, tiles[k], self.frames_per_pass, report)
            new_tiles.append(tile_state)
            return frames

        frames = self._blend(latents, rows, cols, decode_tile, chunks=1)
        return frames, TiledState(tuple(new_tiles))

    @torch.no_grad()
    def decode_stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Each chunk's frames in turn (the tiled decode_chunk's frames, bit for bit), decoded in segments.

        Chunks are gathered into segments of ``segment_frames`` latent frames; a segment is decoded tile after tile,
        each tile continuing its own causal stream, whose caches wait in host memory until the next segment (if
        there is one). Gathering pulls chunks ahead: with a sampler upstream, a chunk is denoised before the frames
        of the segment before it come out.
        """
        meta, parked = self.vae.initial_state(), None
        for segment, last in self._segments(chunks):
            for chunk in segment:
                self.vae.check_latents(chunk, meta, self.frames_per_pass)
            latents = torch.cat(segment, dim=2)
            rows, cols = self._spans(latents)
            parked = parked or [None] * (len(rows) * len(cols))
            started = meta.started

            def decode_tile(k: int, tile: torch.Tensor, report) -> torch.Tensor:
                box = [_unpark(parked[k])]
                frames = self.vae.decode_passes(tile, box, started, self.frames_per_pass, report)
                parked[k] = None if last else _park(box[0])
                return frames

            frames = self._blend(latents, rows, cols, decode_tile, chunks=len(segment))
            sizes = [self._video_frames(c.shape[2], first=not started and i == 0) for i, c in enumerate(segment)]
            yield from frames.split(sizes, dim=2)
            meta = meta.advanced(None, latents)

    def _segments(self, chunks: Iterable[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], bool]]:
        """(chunks of at least ``segment_frames`` latent frames, whether it is the last segment). A full segment
        is handed out only once the next chunk exists, so the last one is known as such."""
        segment: list[torch.Tensor] = []
        for chunk in chunks:
            if sum(c.shape[2] for c in segment) >= self.segment_frames:
                yield segment, False
                segment = []
            segment.append(chunk)
        if segment:
            yield segment, True

    def _video_frames(self, latent_frames: int, first: bool) -> int:
        """Video frames decoded from ``latent_frames``; the video's first latent frame gives one frame."""
        factor = self.vae.config.temporal_factor
        return 1 + factor * (latent_frames - 1) if first else factor * latent_frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole video tile by tile (see :meth:`WanVAE.decode`); each tile's caches are freed when it is
        done, so only one tile's caches are alive at a time."""
        rows, cols = self._spans(latents)
        return self._blend(latents, rows, cols,
                           lambda k, tile, report: self.vae.decode_chunk(tile, self.vae.initial_state(),
                                                                         self.frames_per_pass, report)[0], chunks=1)

    def _spans(self, latents: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, z, T, h, w], got shape {tuple(latents.shape)}")
        return (tile_spans(latents.shape[3], self.tile, self.overlap),
                tile_spans(latents.shape[4], self.tile, self.overlap))

    def _blend(self, latents: torch.Tensor, rows, cols, decode_tile, chunks: int) -> torch.Tensor:
        """Decode every tile (row-major, tile k by ``decode_tile(k, tile_latents, report)``, which hands ``report``
        to the VAE's passes) and blend them into frames."""
        scale = self.vae.config.spatial_factor
        out = weights = frames = None
        tiles = len(rows) * len(cols)
        for k, (i, j) in enumerate((i, j) for i in range(len(rows)) for j in range(len(cols))):
            report = None if self.before_pass is None else (
                lambda index, passes, k=k: self.before_pass((k + index / passes) / tiles, chunks))
            (r0, r1), (c0, c1) = rows[i], cols[j]
            frames = decode_tile(k, latents[:, :, :, r0:r1, c0:c1], report)
            if out is None:
                b, c, t = frames.shape[:3]
                out = frames.new_zeros(b, c, t, latents.shape[3] * scale, latents.shape[4] * scale,
                                       dtype=torch.float32)
                weights = torch.zeros(out.shape[3:], device=out.device)
            w = torch.outer(_blend_ramp(rows, i, scale), _blend_ramp(cols, j, scale)).to(out.device)  # [th, tw]
            ys, xs = slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale)
            out[:, :, :, ys, xs] += frames.float() * w
            weights[ys, xs] += w
        assert out is not None and weights is not None and frames is not None
        return out.div_(weights).to(frames.dtype)  # in place: at 1080p a segment of 81 frames is 2 GB in fp32


__all__ = ["TiledDecoder", "TiledState", "tile_spans"]
