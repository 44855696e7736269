"""The HiStream loop (paper Algorithm 1): chunk-by-chunk generation with dual-resolution caching, the
anchor-guided sliding window and asymmetric denoising.

``plan_video`` turns a request and a ``SamplerConfig`` into per-chunk plans (which steps, how many cached frames,
which RoPE positions) without touching a model: the FLOP count reads the same plans. ``stream_video`` runs them and
yields each finished chunk of latents as soon as it exists. Latents here are in the DiT's (normalised) latent space.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .cache import DualResCache, KVCache, window_indices
from .config import SamplerConfig
from .model.rope import shift_time
from .model.wan import AttentionSettings, CausalWanModel, TextKV
from .schedule import renoise, warp_timesteps, x0_from_flow

log = logging.getLogger(__name__)
TRAINED_LATENT_FRAMES = 21  # Self-Forcing and HiStream train on 81-frame clips: 21 latent frames

VAE_SPATIAL_STRIDE = 8
VAE_TEMPORAL_STRIDE = 4


class RequestError(ValueError):
    """A generation request the loop cannot run; ``field`` names the offending input (width, height, frames)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class GenerationInterrupted(RuntimeError):
    """The interrupt hook asked the loop to stop; nothing partial is yielded."""


class NonFiniteLatents(ValueError):
    """A chunk came out NaN or infinite: it would decode to a black video, so the loop stops instead."""


# -- request geometry ----------------------------------------------------------------------------------------------
MAX_SIDE = 8192       # pixels: twice 4K; far past what a 1.3B model was trained for
MAX_FRAMES = 100_001  # 1 h 44 min at 16 fps; the plan of every chunk is made up front


@dataclass(frozen=True)
class VideoGeometry:
    """Pixel request and the latent grids it implies."""

    width: int
    height: int
    frames: int
    latent_frames: int
    high: tuple[int, int]  # latent (height, width) at the target resolution
    low: tuple[int, int]   # latent (height, width) of the low-resolution passes (== high without DRC)

    def num_chunks(self, chunk_frames: int) -> int:
        return -(-self.latent_frames // chunk_frames)


def check_prompt_starts(starts: Sequence[int], geometry: VideoGeometry, chunk_frames: int) -> None:
    """Refuse a scheduled prompt that would start after the video's last chunk (it would silently never be used)."""
    chunks = geometry.num_chunks(chunk_frames)
    late = [start for start in starts if start >= chunks]
    if late:
        fix = (f"start it at frame {chunk_start_frame(chunks - 1, chunk_frames)} or before" if chunks > 1
               else "make the video longer")
        raise RequestError("prompt_schedule", f"a scheduled prompt starts in chunk {late[0] + 1}, but this "
                           f"{geometry.frames}-frame video has {chunks} chunk(s), so it would never be used: {fix}")


def size_step(cfg: SamplerConfig, patch: int = 2) -> int:
    """The pixel step of valid widths and heights: whole DiT tokens (16 px for Wan) at full resolution and, with
    dual-resolution caching, at ``low_res_scale`` too (computed exactly: 0.7 is 7/10, not the float below it)."""
    token = VAE_SPATIAL_STRIDE * patch
    if not cfg.drc:
        return token
    scale = Fraction(cfg.low_res_scale).limit_denominator(1000)  # v * p/q whole tokens <=> v multiple of below
    return math.lcm(token, token * scale.denominator // math.gcd(scale.numerator, token * scale.denominator))


def untrained_positions(geometry: VideoGeometry, cfg: SamplerConfig) -> str | None:
    """A warning when frames would sit at temporal RoPE positions the model never saw in training, else None."""
    if cfg.rope_positions != "absolute" or geometry.latent_frames <= TRAINED_LATENT_FRAMES:
        return None
    return (f"{geometry.latent_frames} latent frames at absolute RoPE positions: frames past {TRAINED_LATENT_FRAMES} "
            "(video frame 81) sit at temporal positions the model was never trained on; rope_positions 'window' "
            "(--rope-positions window, the Anchor Window Cache node) keeps every position inside the window")


def video_geometry(width: int, height: int, frames: int, cfg: SamplerConfig, patch: int = 2) -> VideoGeometry:
    """Validate a request and derive its latent grids; errors say what to change."""
    if not isinstance(cfg, SamplerConfig):
        raise ValueError(f"the sampler config must be a SamplerConfig, got {cfg!r}: modes.mode_config(name) gives a "
                         "mode's (HiStreamPipeline.generate takes a mode's name as mode=)")
    limits = (("width", width, MAX_SIDE), ("height", height, MAX_SIDE), ("frames", frames, MAX_FRAMES))
    for name, value, limit in limits:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise RequestError(name, f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
        if value > limit:
            raise RequestError(name, f"{name} {value} is above the limit of {limit:,}; ask for less")
    step = size_step(cfg, patch)
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise RequestError(name, f"{name} must be a positive number of pixels, got {value}; use a multiple of "
                               f"{step}, e.g. {step * (60 if name == 'width' else 34)}")
        if value % step:
            lower, upper = value // step * step, (value // step + 1) * step
            why = (f"dual-resolution caching runs the low-res passes at {cfg.low_res_scale:g}x, so the size must be "
                   f"a multiple of {step}" if cfg.drc else f"the model works on {step}-pixel tokens")
            suggestion = f"{lower} or {upper}" if lower > 0 else str(upper)
            if step > 64:  # an awkward scale (0.33 needs multiples of 1600): a rounder one is the better fix
                suggestion += " or a low-res scale that divides evenly (0.5: multiples of 32, 0.25 or 0.75: of 64)"
            raise RequestError(name, f"{name} {value} does not fit the latent grid ({why}); use {suggestion}")
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_STRIDE:
        lower = max(1, frames - (frames - 1) % VAE_TEMPORAL_STRIDE)
        raise RequestError("frames", f"frames must be 4k+1 (1, 5, 9, ..., 81, 85, ...) because the VAE packs 4 "
                                     f"frames per latent after the first; got {frames}: use {lower} or {lower + 4}")
    high = (height // VAE_SPATIAL_STRIDE, width // VAE_SPATIAL_STRIDE)
    low = (round(high[0] * cfg.low_res_scale), round(high[1] * cfg.low_res_scale)) if cfg.drc else high
    return VideoGeometry(width, height, frames, (frames - 1) // VAE_TEMPORAL_STRIDE + 1, high, low)


# -- the plan ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCall:
    """One forward of the DiT: what it processes and what it attends to (used for FLOPs and progress)."""

    kind: str                 # "low", "high" (denoising) or "cache_high", "cache_low" (timestep-0 cache pass)
    timestep: float
    latent_hw: tuple[int, int]
    num_frames: int
    cached_frames: int

    @property
    def writes_only(self) -> bool:
        """A (re)cache pass: only its K/V are kept (``CausalWanModel.write_cache``), not its output."""
        return self.kind.startswith(("cache_", "recache_"))


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    first_frame: int            # index of the chunk's first latent frame in the video
    num_frames: int
    rope_start: int             # temporal RoPE position of the chunk's first frame
    cached_frames: int          # frames in each cache when the chunk starts
    cache_positions: tuple[int, ...]  # RoPE positions of those frames (after re-indexing, if any)
    low_steps: tuple[float, ...]      # warped timesteps
    high_steps: tuple[float, ...]
    logit_scale_high: float     # attention logit multiplier of the high-resolution calls
    recache_runs: tuple[tuple[int, int], ...] = ()  # (first cached-frame index, count) re-encoded at a prompt switch
    writes_cache: bool = True   # False for the last chunk: no later chunk would read what it wrote

    def calls(self, geometry: VideoGeometry, drc: bool) -> list[ModelCall]:
        recache = []
        for first, count in self.recache_runs:
            recache.append(ModelCall("recache_high", 0.0, geometry.high, count, first))
            if drc:
                recache.append(ModelCall("recache_low", 0.0, geometry.low, count, first))
        low = [ModelCall("low", t, geometry.low, self.num_frames, self.cached_frames) for t in self.low_steps]
        high = [ModelCall("high", t, geometry.high, self.num_frames, self.cached_frames) for t in self.high_steps]
        cache = []
        if self.writes_cache:
            cache.append(ModelCall("cache_high", 0.0, geometry.high, self.num_frames, self.cached_frames))
            if drc:
                cache.append(ModelCall("cache_low", 0.0, geometry.low, self.num_frames, self.cached_frames))
        return recache + low + high + cache


def first_chunk_logit_scale(cfg: SamplerConfig) -> float:
    """CineScale's attention scaling log(N0 * coef) / log(N0) (see HDConfig); 1 when HD tech is off."""
    hd = cfg.hd
    if not hd.enabled:
        return 1.0
    return math.log(hd.train_tokens_per_frame * hd.first_chunk_attn_coef) / math.log(hd.train_tokens_per_frame)


def window_keep(frames: list, cfg: SamplerConfig) -> list:
    """Which of the (ordered) cached frames survive the anchor-guided sliding window."""
    stream = cfg.stream
    if not stream.window:
        return frames
    return [frames[i] for i in window_indices(len(frames), stream.anchor_frames, stream.local_frames)]


def recache_runs(positions: tuple[int, ...], cfg: SamplerConfig) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive cached frames to re-encode at a prompt switch, as (first index, count), in order.

    Each run becomes one timestep-0 pass at its own RoPE positions (a forward takes consecutive positions).
    """
    start = 0 if cfg.recache_anchor else min(cfg.stream.anchor_frames, len(positions))
    runs: list[list[int]] = []
    for index in range(start, len(positions)):
        if runs and positions[index] == positions[runs[-1][0]] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([index, 1])
    return tuple((first, count) for first, count in runs)


def plan_video(geometry: VideoGeometry, cfg: SamplerConfig, prompt_switches: frozenset[int] = frozenset()
               ) -> list[ChunkPlan]:
    """Per-chunk plans for a whole video; the last chunk may be shorter than ``chunk_frames``.

    Algorithm 1 writes the caches after every chunk; after the last one nothing would read them, so the last chunk
    skips its timestep-0 cache passes (7% of HiStream+'s FLOPs at 1080p, 81 frames). Its frames are unchanged.
    ``prompt_switches``: chunks that start a new prompt of a schedule (they re-encode the cache if ``kv_recache``).
    """
    m = cfg.stream.chunk_frames
    starts = range(0, geometry.latent_frames, m)
    plans, cached = [], []  # cached: video indices of the frames each cache holds
    for index, first in enumerate(starts):
        frames = min(m, geometry.latent_frames - first)
        steps = cfg.first_chunk if index == 0 else cfg.later_chunks
        if cfg.rope_positions == "window":
            positions, rope_start = tuple(range(len(cached))), len(cached)
        else:
            positions, rope_start = tuple(cached), first
        recache = recache_runs(positions, cfg) if cfg.kv_recache and index in prompt_switches else ()
        plans.append(ChunkPlan(
            index=index, first_frame=first, num_frames=frames, rope_start=rope_start, cached_frames=len(cached),
            cache_positions=positions,
            low_steps=warp_timesteps(steps.low, cfg.shift) if steps.low else (),
            high_steps=warp_timesteps(steps.high, cfg.shift),
            logit_scale_high=first_chunk_logit_scale(cfg) if index == 0 else 1.0,
            recache_runs=recache, writes_cache=index < len(starts) - 1))
        cached = window_keep(cached + list(range(first, first + frames)), cfg)
    return plans


# -- progress ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Reported after every model call. ``x0`` is the call's clean estimate (None for cache passes)."""

    chunk: int
    num_chunks: int
    call: int            # 1-based index of this call within the whole run
    total_calls: int
    kind: str
    timestep: float
    x0: torch.Tensor | None
    cached_frames: int


@dataclass(frozen=True)
class LatentChunk:
    index: int
    num_chunks: int
    first_frame: int       # index of its first latent frame in the video (chunk_start_frame gives the video frame)
    latents: torch.Tensor  # [B, C, frames, H/8, W/8] in the DiT's latent space, float32
    seconds: float
    model_calls: int
    cached_frames: int     # frames each cache held while this chunk was denoised


# -- sampling helpers ----------------------------------------------------------------------------------------------
def chunk_noise(seed: int, chunk: int, draw: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Gaussian noise fixed by (seed, chunk, draw, shape): chunk i's noise does not depend on earlier chunks, and is
    the same across modes that draw it at the same shape (dual resolution draws the first one at the low resolution).

    Drawn on the CPU so a seed gives the same video on every device.
    """
    return torch.randn(shape, generator=seeded_generator(f"histream:{seed}:{chunk}:{draw}")).to(device)


def seeded_generator(key: str) -> torch.Generator:
    """A CPU generator seeded from any string (sha256), the same on every machine."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def resize_latents(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize each latent frame.  x # [B, C, F, H, W] -> [B, C, F, hw[0], hw[1]]"""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    b, c, f = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(frames, size=hw, mode=mode, **extra)
    return resized.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the loop ------------------------------------------------------------------------------------------------------
PromptSchedule = Sequence[tuple[int, "TextKV | torch.Tensor"]]  # (first chunk index, conditioning), from chunk 0


def chunk_start_frame(chunk: int, chunk_frames: int) -> int:
    """The first video frame (0-based) of chunk ``chunk``: latent c*M holds video frames 4*c*M-3 .. 4*c*M."""
    return VAE_TEMPORAL_STRIDE * chunk * chunk_frames - 3 if chunk else 0


def chunk_at_frame(frame: int, chunk_frames: int) -> int:
    """The first chunk whose first video frame is at or after ``frame`` (0-based).

    Chunk c starts at latent c*M, i.e. video frame 4*c*M - 3 (frame 0 for the first chunk).
    """
    if frame <= 0:
        return 0
    per_chunk = VAE_TEMPORAL_STRIDE * chunk_frames
    return -(-(frame + VAE_TEMPORAL_STRIDE - 1) // per_chunk)


class StoryError(ValueError):
    """A story's prompt ``index`` (0 = the first) cannot start where asked: ``chunk`` is where it would start, and
    ``earliest_frame`` the first frame that works (None when the first prompt is not at frame 0)."""

    def __init__(self, message: str, index: int, chunk: int, earliest_frame: int | None) -> None:
        super().__init__(message)
        self.index, self.chunk, self.earliest_frame = index, chunk, earliest_frame


def story_chunks(frames: Sequence[int], chunk_frames: int) -> list[int]:
    """The first chunk of each prompt of a story [(first video frame, prompt), ...], checked: it starts at frame 0
    and each prompt takes over in a later chunk than the one before (raises :class:`StoryError`)."""
    if frames[0] != 0:
        raise StoryError(f"a story starts at frame 0 (the first prompt), got {frames[0]}", 0, 0, None)
    starts = [chunk_at_frame(frame, chunk_frames) for frame in frames]
    for i in range(1, len(starts)):
        if starts[i] <= starts[i - 1]:
            earliest = chunk_start_frame(starts[i - 1], chunk_frames) + 1
            raise StoryError(f"the story's prompt at frame {frames[i]} would start in chunk {starts[i] + 1}, not "
                             f"after the one at frame {frames[i - 1]} (chunk {starts[i - 1] + 1}): start it at frame "
                             f"{earliest} or later", i, starts[i], earliest)
    return starts


def prompt_schedule(model: CausalWanModel, text: TextKV | torch.Tensor | PromptSchedule) -> list[tuple[int, TextKV]]:
    """One conditioning, or a schedule of them, as [(first chunk, TextKV)] with text K/V computed once each."""
    entries = [(0, text)] if isinstance(text, (TextKV, torch.Tensor)) else sorted(text, key=lambda e: e[0])
    if not entries or entries[0][0] != 0:
        raise ValueError("a prompt schedule needs an entry for chunk 0 (the first prompt)")
    if len({start for start, _ in entries}) != len(entries):
        raise ValueError("a prompt schedule has two prompts for the same chunk")
    return [(start, t if isinstance(t, TextKV) else model.encode_text(t)) for start, t in entries]


@dataclass(frozen=True)
class _Resolution:
    """One of the two resolutions a chunk runs at: its latent (height, width), its K/V cache, its RoPE factors."""

    size: tuple[int, int]
    cache: KVCache
    rope_factors: tuple[float, float, float]


def _check_text_batch(prompts: list[tuple[int, TextKV]], batch: int) -> None:
    for _, text_kv in prompts:
        if text_kv.layers[0][0].shape[0] not in (1, batch):
            raise ValueError(f"text conditioning holds {text_kv.layers[0][0].shape[0]} prompts but the video batch is "
                             f"{batch}: give the states of one prompt, [1, tokens, dim]")


def _checked_caches(caches: DualResCache | None, num_layers: int, cfg: SamplerConfig) -> DualResCache:
    """The run's caches: new ones, or the caller's (empty, of the model's layers and the config's fp8 setting),
    with the config's sliding window set on both."""
    caches = caches if caches is not None else DualResCache.empty(num_layers, fp8=cfg.kv_cache_fp8)
    if caches.high.num_frames or caches.low.num_frames:
        raise ValueError("stream_video needs empty caches: one DualResCache per video")
    if (caches.high.num_layers, caches.high.fp8) != (num_layers, cfg.kv_cache_fp8):
        given, needed = (" in fp8" if fp8 else "" for fp8 in (caches.high.fp8, cfg.kv_cache_fp8))
        raise ValueError(f"the caches given hold {caches.high.num_layers} layers{given}, the run needs {num_layers}"
                         f"{needed} (the model's layers, the config's kv_cache_fp8): make them with "
                         "DualResCache.empty(model.cfg.num_layers, fp8=cfg.kv_cache_fp8)")
    for cache in (caches.high, caches.low):
        cache.window = (cfg.stream.anchor_frames, cfg.stream.local_frames) if cfg.stream.window else None
    return caches


def stream_video(
    model: CausalWanModel,
    text: TextKV | torch.Tensor | PromptSchedule,
    width: int,
    height: int,
    frames: int,
    cfg: SamplerConfig,
    seed: int,
    *,
    batch: int = 1,
    caches: DualResCache | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[LatentChunk]:
    """Generate a video chunk by chunk (Algorithm 1), yielding each chunk's clean latents as soon as they exist.

    Deterministic for a given (seed, config, request). With the sliding window, memory is flat in the video length:
    the caches never hold more than the window, and nothing of a finished chunk is kept besides its cached K/V (and,
    with a prompt schedule, the clean latents of the cached frames, for the recache).
    ``text``: one conditioning, or a prompt schedule [(first chunk, conditioning), ...] starting at chunk 0.
    ``caches``: pass empty caches to inspect them between chunks (they are filled in place, the loop sets their
    ``window``; the last chunk writes none; make them with ``DualResCache.empty(num_layers, fp8=cfg.kv_cache_fp8)``);
    by default the loop makes its own. ``should_stop`` is checked before every model call; True raises
    ``GenerationInterrupted``. Being a generator, it checks the request when the first chunk is asked for.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be a whole number, got {seed!r}")
    geometry = video_geometry(width, height, frames, cfg, model.cfg.patch_size[1])
    if (warning := untrained_positions(geometry, cfg)) is not None:
        log.warning("%s", warning)
    prompts = prompt_schedule(model, text)
    check_prompt_starts([start for start, _ in prompts], geometry, cfg.stream.chunk_frames)
    plans = plan_video(geometry, cfg, frozenset(start for start, _ in prompts[1:]))
    device = next(model.parameters()).device
    _check_text_batch(prompts, batch)
    caches = _checked_caches(caches, model.cfg.num_layers, cfg)
    hd = cfg.hd
    high = _Resolution(geometry.high, caches.high, hd.rope_factors_high if hd.enabled else (1.0, 1.0, 1.0))
    low = _Resolution(geometry.low, caches.low, hd.rope_factors_low if hd.enabled else (1.0, 1.0, 1.0))
    total_calls = sum(len(p.calls(geometry, cfg.drc)) for p in plans)
    calls_done = 0
    channels = model.cfg.in_dim
    keep_clean = len(prompts) > 1 and cfg.kv_recache
    cached_clean: list[torch.Tensor] = []  # clean latents of the cached frames, in cache order (recache only)

    def run(x, t, text_kv, res: _Resolution, plan, logit_scale, kind, frame_start=None, update=False):
        """One model call at resolution ``res``; returns x0. Checks the interrupt hook first and reports progress
        after."""
        nonlocal calls_done
        if should_stop is not None and should_stop():
            raise GenerationInterrupted(f"interrupted in chunk {plan.index + 1} of {len(plans)}")
        settings = AttentionSettings(cfg.attention_backend, res.rope_factors, logit_scale)
        timestep = torch.full((x.shape[0],), t, device=device)
        # Only full-size chunks use compiled graphs: a short last chunk or a recache run (even of M frames) happens
        # once per video, where compiling another graph would cost more than it saves.
        compiled = x.shape[2] == cfg.stream.chunk_frames and not kind.startswith("recache")
        call = model.write_cache if update else model
        v = call(x, timestep, text_kv, cache=res.cache, settings=settings, compiled=compiled,
                 frame_start=plan.rope_start if frame_start is None else frame_start)
        calls_done += 1
        x0 = None if update else x0_from_flow(x, v, t)
        if on_progress is not None:
            on_progress(Progress(plan.index, len(plans), calls_done, total_calls, kind, t, x0, plan.cached_frames))
        return x0

    def recache(plan, text_kv):
        """KV recache at a prompt switch: re-encode the cached frames' K/V under the new prompt, run by run (at logit
        scale 1: the anchor does not get chunk 1's attention scaling again)."""
        for res in (high, low) if cfg.drc else (high,):  # without DRC KV_low stays empty
            res.cache.keep(list(range(plan.recache_runs[0][0])))
        for first, count in plan.recache_runs:
            clean = torch.cat(cached_clean[first:first + count], dim=2)
            start = plan.cache_positions[first]
            run(clean, 0.0, text_kv, high, plan, 1.0, "recache_high", start, update=True)
            if cfg.drc:
                run(resize_latents(clean, low.size, cfg.downsample), 0.0, text_kv, low, plan, 1.0, "recache_low",
                    start, update=True)

    for plan in plans:
        started = time.perf_counter()
        text_kv = next(t for start, t in reversed(prompts) if start <= plan.index)
        high_shape = (batch, channels, plan.num_frames, *high.size)
        low_shape = (batch, channels, plan.num_frames, *low.size)
        if cfg.rope_positions == "window":
            for res in (high, low):
                if res.cache.num_frames:
                    res.cache.reposition(list(plan.cache_positions), lambda k, d, f=res.rope_factors: shift_time(
                        k, d, model.cfg.rope_split, model.cfg.rope_theta, f[0]))
        # 0. Prompt switch (LongLive's KV recache): the cached frames are re-encoded under the new prompt.
        if plan.recache_runs:
            recache(plan, text_kv)
        draw = 0  # noise draws of this chunk: 0 = initial noise, k = re-noise before the k-th step

        # 1. Low-resolution steps with KV_low (lines 4-12): pure noise -> x0 estimate at low resolution.
        x = chunk_noise(seed, plan.index, draw, low_shape if plan.low_steps else high_shape, device)
        for j, t in enumerate(plan.low_steps):
            x0 = run(x, t, text_kv, low, plan, 1.0, "low")
            if j + 1 < len(plan.low_steps):
                draw += 1
                x = renoise(x0, chunk_noise(seed, plan.index, draw, low_shape, device), plan.low_steps[j + 1])
        # 2. Upsample the last low-res x0 and re-noise it to the first high-res timestep (lines 7-11).
        if plan.low_steps:
            draw += 1
            x = renoise(resize_latents(x0, high.size, cfg.upsample),
                        chunk_noise(seed, plan.index, draw, high_shape, device), plan.high_steps[0])

        # 3. High-resolution steps with KV_high (lines 13-16, 26-28); the last x0 is the chunk's output.
        for j, t in enumerate(plan.high_steps):
            x0 = run(x, t, text_kv, high, plan, plan.logit_scale_high, "high")
            if j + 1 < len(plan.high_steps):
                draw += 1
                x = renoise(x0, chunk_noise(seed, plan.index, draw, high_shape, device), plan.high_steps[j + 1])
        clean = x0
        # read after the chunk's last call, so it costs no extra sync (a memory prediction's meta tensors hold none)
        finite = None if clean.is_meta else torch.isfinite(clean).all()

        if plan.writes_cache:  # every chunk but the last
            # 4. Dual-resolution caching (lines 17-18): timestep-0 passes of the clean chunk write KV_high and,
            #    downsampled, KV_low.
            run(clean, 0.0, text_kv, high, plan, plan.logit_scale_high, "cache_high", update=True)
            if cfg.drc:
                run(resize_latents(clean, low.size, cfg.downsample), 0.0, text_kv, low, plan, 1.0, "cache_low",
                    update=True)

            # 5. Anchor-guided sliding window (lines 19-25): the caches kept only the anchor frame(s) and the last
            #    local frames as they were written (their ``window``), so they never held more.
            if keep_clean:
                cached_clean = window_keep(cached_clean + list(clean.split(1, dim=2)), cfg)

        _synchronize(device)
        if finite is not None and not finite:
            raise NonFiniteLatents(
                f"chunk {plan.index + 1} came out as NaN/inf: check that the checkpoint's weights and the text "
                f"conditioning are finite and that the schedule's shift ({cfg.shift:g}) is a normal number; with "
                "fp16 compute, try bf16 (fp16 can overflow)")
        seconds = time.perf_counter() - started
        log.info("chunk %d/%d: %d latent frames in %.3f s", plan.index + 1, len(plans), plan.num_frames, seconds)
        yield LatentChunk(plan.index, len(plans), plan.first_frame, clean.float(), seconds,
                          len(plan.calls(geometry, cfg.drc)), plan.cached_frames)


def generate_video(model: CausalWanModel, text, width: int, height: int, frames: int, cfg: SamplerConfig,
                   seed: int, **kwargs) -> torch.Tensor:
    """All chunks concatenated along time: # [B, C, latent_frames, H/8, W/8]. Convenience for short videos."""
    return torch.cat([chunk.latents for chunk in stream_video(model, text, width, height, frames, cfg, seed,
                                                               **kwargs)], dim=2)


__all__ = ["RequestError", "GenerationInterrupted", "VideoGeometry", "video_geometry", "size_step",
           "untrained_positions", "check_prompt_starts", "ModelCall", "ChunkPlan", "plan_video", "Progress",
           "LatentChunk", "NonFiniteLatents", "PromptSchedule", "prompt_schedule", "StoryError", "story_chunks",
           "chunk_at_frame", "chunk_start_frame", "stream_video", "generate_video", "chunk_noise", "seeded_generator",
           "resize_latents"]
