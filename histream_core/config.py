"""Configuration dataclasses: the network, the streaming window, and presets as data.

Every invariant is checked in ``__post_init__`` with a ``ValueError`` that names the field and the fix,
so a bad config fails where it is built, not deep inside a forward pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace


def _check_types(config, *, ints: tuple[str, ...] = (), flags: tuple[str, ...] = (),
                 numbers_: tuple[str, ...] = ()) -> None:
    """Whole numbers, booleans and real numbers where the fields say so (True is not 1, "no" is not False)."""
    name = type(config).__name__
    for field in ints:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name}.{field} must be a whole number, got {value!r}")
    for field in flags:
        if not isinstance(getattr(config, field), bool):
            raise ValueError(f"{name}.{field} must be True or False, got {getattr(config, field)!r}")
    for field in numbers_:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name}.{field} must be a number, got {value!r}")


def _float_tuple(config, field: str, length: int | None = None) -> None:
    """Store a sequence field as a tuple of floats (hashable, as a frozen config should be), checking its items."""
    value = getattr(config, field)
    name = type(config).__name__
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
        raise ValueError(f"{name}.{field} must be a tuple of numbers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name}.{field} must hold {length} numbers (time, height, width), got {value!r}")
    object.__setattr__(config, field, tuple(float(v) for v in value))


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Wan2.1 text-to-video DiT.

    Parameter names of the model built from this config match the original Wan checkpoints.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len",
                     "in_dim", "out_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.freq_dim % 2:
            raise ValueError(f"ModelConfig.freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"ModelConfig.patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if min(self.rope_split) <= 0 or any(d % 2 for d in self.rope_split):
            raise ValueError(
                f"head_dim {self.head_dim} cannot be split into three even RoPE axes {self.rope_split}; "
                "pick an even dim/num_heads of at least 6 (Wan uses 128: 44/42/42)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels given to the (time, height, width) RoPE axes, as in Wan: d-4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


MODEL_PRESETS: dict[str, ModelConfig] = {
    "wan2.1-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Small enough for CPU tests in milliseconds; head_dim 24 splits 8/8/8 across the RoPE axes.
    "tiny": ModelConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16),
}


@dataclass(frozen=True)
class StreamConfig:
    """Chunking and the anchor-guided sliding window (paper section 3.3).

    ``window=False`` keeps every past frame in the cache (the "w/o AGSW" ablation).
    With the window on, a cache holds the first ``anchor_frames`` latent frames plus the last ``local_frames``;
    the paper's setting is M=3, 1 anchor, M-1=2 local frames, so a chunk attends to at most 2M frames.
    """

    chunk_frames: int = 3
    anchor_frames: int = 1
    local_frames: int = 2
    window: bool = True

    def __post_init__(self) -> None:
        _check_types(self, ints=("chunk_frames", "anchor_frames", "local_frames"), flags=("window",))
        if self.chunk_frames < 1:
            raise ValueError(f"StreamConfig.chunk_frames must be >= 1 latent frame, got {self.chunk_frames}")
        if self.anchor_frames < 0 or self.local_frames < 0:
            raise ValueError("StreamConfig.anchor_frames and local_frames must be >= 0")
        if self.window and self.anchor_frames + self.local_frames < 1:
            raise ValueError("a sliding window needs at least one anchor or local frame; "
                             "set window=False for a full cache")





@dataclass(frozen=True)
class ChunkSteps:
    """The denoising steps of one chunk, in Self-Forcing's *base* units (before warping through the shift).

    ``low`` run at low resolution with KV_low, then the last low x0 is upsampled and re-noised to the first ``high``
    step; ``high`` run at full resolution with KV_high. ``low=()`` means the chunk is denoised at full resolution only.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        _float_tuple(self, "low")
        _float_tuple(self, "high")
        if not self.high:
            raise ValueError("every chunk needs at least one high-resolution step (its output is high-res)")
        steps = self.low + self.high
        if any(not 0 < t <= 1000 for t in steps):
            raise ValueError(f"step timesteps must lie in (0, 1000], got {steps}")
        if list(steps) != sorted(steps, reverse=True) or len(set(steps)) != len(steps):
            raise ValueError(f"steps must strictly decrease from noise to clean, got low={self.low} high={self.high}")


# Self-Forcing's four steps split between the resolutions: the default of both chunk kinds (mode "histream")
FOUR_STEPS_DRC = ChunkSteps(low=(1000.0, 750.0), high=(500.0, 250.0))


@dataclass(frozen=True)
class HDConfig:
    """HiStream's "HD tech" for inference above the tuning resolution (paper Appendix A.2).

    * NTK RoPE (CineScale convention): the RoPE base of each axis is multiplied by its factor, time untouched.
      The paper tunes with factor 2 at 960x544 and infers with 5 at 1920x1088, so the low-resolution passes use
      ``rope_factors_low`` (2) and the high-resolution passes ``rope_factors_high`` (5).
    * Attention scaling (our reading of "attention scaling factor 2 for the initial chunk only"): CineScale scales the
      softmax logits by log(N0 * coef) / log(N0) on top of 1/sqrt(d), N0 being the tokens per frame at the tuning
      resolution (960x544 -> 34*60 = 2040). We use coef = ``first_chunk_attn_coef`` (2) for every high-resolution
      model call of chunk 1 and coef 1 (no scaling) everywhere else.
    ``enabled=False`` gives plain RoPE and attention everywhere (the Self-Forcing baseline; the "w/o HD tech" ablation
    keeps the tuning's factor 2 instead, see ``modes``).
    """

    enabled: bool = True
    rope_factors_high: tuple[float, float, float] = (1.0, 5.0, 5.0)
    rope_factors_low: tuple[float, float, float] = (1.0, 2.0, 2.0)
    first_chunk_attn_coef: float = 2.0
    train_tokens_per_frame: int = 2040

    def __post_init__(self) -> None:
        _check_types(self, ints=("train_tokens_per_frame",), flags=("enabled",), numbers_=("first_chunk_attn_coef",))
        _float_tuple(self, "rope_factors_high", 3)
        _float_tuple(self, "rope_factors_low", 3)
        if not all(0 < f < math.inf for f in self.rope_factors_high + self.rope_factors_low):
            raise ValueError("RoPE NTK factors must be positive numbers")
        if not 0 < self.first_chunk_attn_coef < math.inf or self.train_tokens_per_frame < 2:
            raise ValueError("first_chunk_attn_coef must be a positive number and train_tokens_per_frame >= 2")


UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
DOWNSAMPLE_MODES = ("area", "bilinear", "bicubic", "nearest")
ROPE_POSITION_POLICIES = ("absolute", "window")


@dataclass(frozen=True)
class SamplerConfig:
    """Every switch of the HiStream loop; the modes in ``modes.py`` are presets over these fields.

    drc: dual-resolution caching (low-res steps + KV_low); off = every step at full resolution, KV_high only.
    low_res_scale: low resolution = scale * target (0.5: 960x544 for 1920x1088).
    shift: timestep shift used to warp the step lists (7 at 1080p per the paper; Self-Forcing uses 5).
    first_chunk / later_chunks: per-chunk step lists (asymmetric denoising = later chunks with fewer steps).
    upsample / downsample: interpolation of the latent between resolutions. Bicubic up keeps the upsampled x0 smooth
      without nearest's blocks (which the high-res steps would have to remove); area down averages each 2x2 block, an
      alias-free box filter, so KV_low sees the chunk as a plain low-resolution render.
    rope_positions: "absolute" keeps every frame's own temporal position (within training for 21 latent frames);
      "window" re-indexes the cached frames to consecutive positions 0..n-1 before each chunk and places the chunk
      right after them, so no position ever exceeds the window (for videos far longer than 21 latent frames).
    kv_recache: when a prompt schedule switches prompts at a chunk, first recompute the cached frames' K/V with the
      new prompt (LongLive's "KV recache": timestep-0 passes over the clean frames, written back at their positions);
      without it the cache still speaks the old prompt and the new one takes hold slowly or not at all.
    recache_anchor: include the anchor frame(s) in the recache; off keeps the anchor on the old prompt (stronger
      continuity of the first frame's look, weaker switch).
    kv_cache_fp8: store both K/V caches as float8 e4m3 with a scale per token and head: about half the cache
      memory (2.7 GiB less at 1080p), at the error measured in benchmarks/NOTES.md; off by default.
    """

    stream: StreamConfig = StreamConfig()
    drc: bool = True
    low_res_scale: float = 0.5
    shift: float = 7.0
    first_chunk: ChunkSteps = FOUR_STEPS_DRC
    later_chunks: ChunkSteps = FOUR_STEPS_DRC
    hd: HDConfig = HDConfig()
    upsample: str = "bicubic"
    downsample: str = "area"
    rope_positions: str = "absolute"
    attention_backend: str = "sdpa"
    kv_recache: bool = True
    recache_anchor: bool = True
    kv_cache_fp8: bool = False

    def __post_init__(self) -> None:
        _check_types(self, flags=("drc", "kv_recache", "recache_anchor", "kv_cache_fp8"),
                     numbers_=("low_res_scale", "shift"))
        if not 0 < self.low_res_scale <= 1:
            raise ValueError(f"low_res_scale must be in (0, 1], got {self.low_res_scale}")
        if not (0 < self.shift < math.inf):
            raise ValueError(f"shift must be a positive number, got {self.shift}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {self.downsample!r}")
        if self.rope_positions not in ROPE_POSITION_POLICIES:
            raise ValueError(f"rope_positions must be one of {ROPE_POSITION_POLICIES}, got {self.rope_positions!r}")
        if not self.drc and (self.first_chunk.low or self.later_chunks.low):
            raise ValueError("low-resolution steps need dual-resolution caching: set drc=True or move them to high")

    def with_(self, **changes) -> "SamplerConfig":
        return replace(self, **changes)
