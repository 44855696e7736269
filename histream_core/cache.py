"""Explicit self-attention K/V caches, owned by the caller (the sampler) and passed into the model's forward.

A ``KVCache`` holds, for every transformer block, the keys (after RoPE) and values of a set of latent frames at one
resolution, plus the temporal RoPE position of each frame. Frames are kept in video order. The model reads it
during every call and writes to it only when asked (the timestep-0 cache pass). ``DualResCache`` pairs a
high-resolution and a low-resolution cache (the paper's KV_high / KV_low).

``fp8=True`` stores K/V as float8 e4m3 with one scale per token and head (absmax over head_dim), about half the
bytes; reads dequantize to the dtype they were written in. Off by default: see benchmarks/NOTES.md for its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def window_indices(num_frames: int, anchor_frames: int, local_frames: int) -> list[int]:
    """Which of ``num_frames`` ordered frames the anchor-guided sliding window keeps: the first ``anchor_frames``
    and the last ``local_frames`` (the same rule for the caches and for the plan that predicts them)."""
    first = range(min(anchor_frames, num_frames))
    last = range(max(num_frames - local_frames, 0), num_frames)
    return sorted(set(first) | set(last))


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_fp8(t: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t # [..., n] -> (float8 values, scale # [..., 1]) with t ~= values * scale: absmax scaling over the last dim.

    The scale is rounded to t's dtype, so that dividing in t's dtype needs no fp32 copy of t (run eagerly, this is
    what the fp8 matmul pays per GEMM input, and the FFN's hidden layer is large at 1080p); it is returned in
    ``scale_dtype`` (default t's dtype, as the KV cache stores it; fp32 for ``_scaled_mm``), exactly."""
    absmax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True)  # no |t| temporary
    # floored at t's smallest normal: a smaller floor underflows in fp16 (an all-zero row gave 0/0 = NaN)
    scale = (absmax.float() / FP8_MAX).clamp_min(torch.finfo(t.dtype).smallest_normal).to(t.dtype)
    values = (t / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return values, scale.to(scale_dtype or t.dtype)


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.to(scale.dtype) * scale


@dataclass
class KVCache:
    num_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)    # per block  # [B, F*S, heads, head_dim]
    values: list[torch.Tensor | None] = field(default_factory=list)  # per block  # [B, F*S, heads, head_dim]
    positions: list[int] = field(default_factory=list)               # temporal RoPE position of each cached frame
    tokens_per_frame: int | None = None                              # S, fixed by the cache's resolution
    fp8: bool = False                                                # keys/values float8, scales beside them
    key_scales: list[torch.Tensor | None] = field(default_factory=list)    # fp8 only  # [B, F*S, heads, 1]
    value_scales: list[torch.Tensor | None] = field(default_factory=list)  # fp8 only  # [B, F*S, heads, 1]
    window: tuple[int, int] | None = None  # (anchor, local) frames kept by every write; None keeps all

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers
        if self.fp8 and not self.key_scales:
            self.key_scales = [None] * self.num_layers
            self.value_scales = [None] * self.num_layers

    def _tracks(self) -> list[list[torch.Tensor | None]]:
        """Every per-block list that holds one row per cached token (frame operations apply to all alike)."""
        return [self.keys, self.values, self.key_scales, self.value_scales] if self.fp8 else [self.keys, self.values]

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    @property
    def num_tokens(self) -> int:
        return 0 if self.tokens_per_frame is None else self.num_frames * self.tokens_per_frame

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Block ``index``'s cached (keys, values) # each [B, F*S, heads, head_dim], or None while empty."""
        if not self.positions:
            return None
        if self.fp8:
            return (dequantize_fp8(self.keys[index], self.key_scales[index]),
                    dequantize_fp8(self.values[index], self.value_scales[index]))
        return self.keys[index], self.values[index]

    def write(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int],
              tokens_per_frame: int) -> None:
        """Store K/V of ``len(positions)`` frames for every block; a position already held is overwritten in place.

        new_kv[i] = (k, v) of block i  # each [B, len(positions)*S, heads, head_dim]; stored detached.
        """
        if len(new_kv) != self.num_layers:
            raise ValueError(f"cache has {self.num_layers} layers but got K/V for {len(new_kv)}")
        pending = self.begin_write(positions, tokens_per_frame)
        for index, (k, v) in enumerate(new_kv):
            pending.layer(index, k, v)
        pending.finish()

    def begin_write(self, positions: list[int], tokens_per_frame: int) -> CacheWrite:
        """Start writing frames at ``positions`` block by block (see :class:`CacheWrite`), so a model can store each
        block's K/V as soon as it exists instead of holding every block's until the end of the call. With a
        ``window``, frames it drops are never stored: the cache does not grow past the window even mid-write."""
        if self.tokens_per_frame not in (None, tokens_per_frame):
            raise ValueError(f"cache holds {self.tokens_per_frame} tokens per frame, cannot add frames of "
                             f"{tokens_per_frame}: use one cache per resolution")
        return CacheWrite(self, list(positions), tokens_per_frame)

    def _frames(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(1, (-1, self.tokens_per_frame))  # [B, F, S, heads, head_dim]

    def keep(self, frame_indices: list[int]) -> None:
        """Keep only the frames at these indices (into ``positions``), dropping the rest."""
        if frame_indices == list(range(self.num_frames)):
            return
        if not all(0 <= j < self.num_frames for j in frame_indices):
            raise IndexError(f"cannot keep frames {frame_indices}: the cache holds {self.num_frames}")
        index = torch.tensor(frame_indices, dtype=torch.long, device=self.keys[0].device)
        for track in self._tracks():
            for i in range(self.num_layers):
                track[i] = self._frames(track[i]).index_select(1, index).flatten(1, 2)
        self.positions = [self.positions[j] for j in frame_indices]

    def slide_window(self, anchor_frames: int, local_frames: int) -> None:
        """Anchor-guided sliding window: keep the first ``anchor_frames`` and the last ``local_frames`` frames."""
        self.keep(window_indices(self.num_frames, anchor_frames, local_frames))

    def reposition(self, new_positions: list[int], rotate) -> None:
        """Give the cached frames new temporal RoPE positions, re-rotating their keys in place of recomputing them.

        rotate(keys, delta_frames) -> keys turned by delta_frames along the time axis (``rope.shift_time``).
        """
        if len(new_positions) != self.num_frames:
            raise ValueError(f"need {self.num_frames} new positions, got {len(new_positions)}")
        deltas = [new - old for new, old in zip(new_positions, self.positions)]
        if any(deltas):
            for i in range(self.num_layers):
                keys = self.layer(i)[0]
                frames = self._frames(keys)
                moved = torch.stack([rotate(frames[:, j], d) if d else frames[:, j] for j, d in enumerate(deltas)],
                                    dim=1).flatten(1, 2)
                if self.fp8:
                    self.keys[i], self.key_scales[i] = quantize_fp8(moved)
                else:
                    self.keys[i] = moved
        self.positions = list(new_positions)


class CacheWrite:
    """A write of new frames into a :class:`KVCache`, one block at a time.

    Blocks already written hold the new frames while the others do not, so the cache must not be read as a whole
    until :meth:`finish`; a model reads only block ``i`` before writing block ``i``, which is consistent.
    """

    def __init__(self, cache: KVCache, positions: list[int], tokens_per_frame: int) -> None:
        self.cache, self.positions, self.tokens_per_frame = cache, positions, tokens_per_frame
        merged = sorted(set(cache.positions) | set(positions))
        if cache.window is not None:
            merged = [merged[i] for i in window_indices(len(merged), *cache.window)]
        self.merged = merged  # the positions held after the write
        self.written: set[int] = set()

    def layer(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store block ``index``'s K/V of the new frames  # each [B, len(positions)*S, heads, head_dim] (detached)."""
        cache = self.cache
        k, v = k.detach(), v.detach()
        if cache.fp8:
            (k, key_scale), (v, value_scale) = quantize_fp8(k), quantize_fp8(v)
            cache.key_scales[index] = self._merge(cache.key_scales[index], key_scale)
            cache.value_scales[index] = self._merge(cache.value_scales[index], value_scale)
        cache.keys[index] = self._merge(cache.keys[index], k)
        cache.values[index] = self._merge(cache.values[index], v)
        self.written.add(index)

    def _merge(self, old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        new = new.unflatten(1, (-1, self.tokens_per_frame))  # [B, F, S, heads, head_dim]
        held = self.cache.positions if old is not None else []
        if self.merged == held + self.positions:  # the common case without a window: append after the last frame
            return new.flatten(1, 2) if old is None else torch.cat([self.cache._frames(old), new], 1).flatten(1, 2)
        by_position = {} if old is None else {p: frame for p, frame in zip(held, self.cache._frames(old).unbind(1))}
        by_position.update(zip(self.positions, new.unbind(1)))
        return torch.stack([by_position[p] for p in self.merged], dim=1).flatten(1, 2)

    def finish(self) -> None:
        """Make the new frames part of the cache; every block must have been written."""
        missing = sorted(set(range(self.cache.num_layers)) - self.written)
        if missing:
            raise ValueError(f"cache write left blocks {missing} without K/V for frames {self.positions}")
        self.cache.tokens_per_frame = self.tokens_per_frame
        self.cache.positions = self.merged


@dataclass
class DualResCache:
    """KV_high and KV_low of the paper's dual-resolution caching; with DRC off only ``high`` is used."""

    high: KVCache
    low: KVCache

    @classmethod
    def empty(cls, num_layers: int, fp8: bool = False) -> DualResCache:
        return cls(KVCache(num_layers, fp8=fp8), KVCache(num_layers, fp8=fp8))
