"""Anchor Window Cache: the chunking and the anchor-guided sliding window (paper section 3.3) as one value."""

from __future__ import annotations

from dataclasses import dataclass

from ..histream_core.config import ROPE_POSITION_POLICIES, StreamConfig
from .errors import input_error

NODE = "Anchor Window Cache"
KV_CACHE_DTYPES = ("model dtype", "fp8_e4m3fn")


@dataclass(frozen=True)
class HiStreamWindow:
    """The HISTREAM_WINDOW value; the sampler puts it into its SamplerConfig."""

    stream: StreamConfig
    rope_positions: str
    kv_cache_fp8: bool = False


class HiStreamAnchorWindow:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "enable": ("BOOLEAN", {"default": True, "label_on": "sliding window", "label_off": "full cache",
                                   "tooltip": "Off keeps every past frame in the cache (the paper's w/o AGSW "
                                              "ablation): memory and time per chunk then grow with the video."}),
            "chunk_frames": ("INT", {"default": 3, "min": 1, "max": 21, "step": 1, "tooltip": (
                "Latent frames generated per chunk (M). 3 latent frames = 12 video frames; the models are trained "
                "with 3.")}),
            "anchor_frames": ("INT", {"default": 1, "min": 0, "max": 21, "step": 1, "tooltip": (
                "First latent frames kept in the cache for good (the attention sink that holds the scene).")}),
            "local_frames": ("INT", {"default": 2, "min": 0, "max": 21, "step": 1, "tooltip": (
                "Most recent latent frames kept in the cache (M-1 in the paper), so a chunk attends to at most "
                "anchor + local + M frames.")}),
            "rope_positions": (list(ROPE_POSITION_POLICIES), {"default": "absolute", "tooltip": (
                "absolute: every frame keeps its own time position (fine up to 21 latent frames = 81 video frames, "
                "the trained length). window: cached frames are renumbered 0..n-1 before each chunk, so positions "
                "never grow: use it for videos much longer than 81 frames.")}),
        }, "optional": {
            "kv_cache_dtype": (list(KV_CACHE_DTYPES), {"default": "model dtype", "tooltip": (
                "fp8_e4m3fn stores both K/V caches in 8 bits with a scale per token and head: about half the cache "
                "memory (2.7 GiB less at 1080p), the first chunk unchanged, later ones slightly off (see the "
                "README's memory section). model dtype keeps them exact.")}),
        }}

    RETURN_TYPES = ("HISTREAM_WINDOW",)
    RETURN_NAMES = ("window",)
    FUNCTION = "build"
    CATEGORY = "HiStream"
    DESCRIPTION = ("Chunk size, the anchor-guided sliding window and the storage of the KV caches; feeds the "
                   "Dual-Res Sampler.")

    def build(self, enable, chunk_frames, anchor_frames, local_frames, rope_positions, kv_cache_dtype="model dtype"):
        if enable and anchor_frames + local_frames < 1:
            raise input_error(NODE, "local_frames", "a sliding window needs at least one anchor or local frame; "
                              "raise local_frames (2 in the paper) or turn enable off for a full cache")
        stream = StreamConfig(chunk_frames=chunk_frames, anchor_frames=anchor_frames, local_frames=local_frames,
                              window=enable)
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise input_error(NODE, "kv_cache_dtype", f"{kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        return (HiStreamWindow(stream, rope_positions, kv_cache_fp8=kv_cache_dtype == "fp8_e4m3fn"),)
