"""Dual-Res Sampler: the HiStream loop (paper Algorithm 1) on ComfyUI's Wan conditioning, returning a LATENT.

A mode preset (``histream_core.modes``) sets every switch; the override inputs change single knobs, -1 / empty
meaning "the mode's value". A knob the mode does not use (e.g. the NTK factors of "self-forcing", which runs without
HD tech) must stay -1: setting it is an error rather than a silent no-op.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from PIL import Image

from ..histream_core.config import SamplerConfig
from ..histream_core.modes import (FLOAT_KNOBS, MODES, STEP_KNOBS, STEPS_EXAMPLE, KnobError, knob_values,
                                   mode_config, with_knobs)
from ..histream_core.sampler import (LatentChunk, NonFiniteLatents, RequestError, StoryError, VideoGeometry,
                                     chunk_start_frame, stream_video, untrained_positions, video_geometry)
from ..histream_core.vae import denormalize, frames_to_images, latent_preview
from . import host
from .errors import input_error, out_of_memory_advice
from .decode import cached_tiny_decoder
from .loader import HiStreamModel
from .schedule import NODE as SCHEDULE_NODE
from .schedule import HiStreamPrompts
from .window import HiStreamWindow

log = logging.getLogger(__name__)

NODE = "HiStream Dual-Res Sampler"
MODE_VALUE = -1.0  # an override left at this value (or an empty step string) takes the mode's
WAN_TEXT_DIM = 4096  # umT5-XXL, the text encoder of every Wan2.1 checkpoint


# -- modes and overrides -----------------------------------------------------------------------------------------------
def build_config(mode: str, window: HiStreamWindow | None = None, attention_backend: str = "sdpa",
                 **overrides) -> SamplerConfig:
    """The mode's SamplerConfig with the window and the overrides (the core's KNOBS) applied."""
    knobs = {name: value for name in FLOAT_KNOBS if (value := overrides.get(name, MODE_VALUE)) != MODE_VALUE}
    knobs.update({name: text for name in STEP_KNOBS if (text := overrides.get(name, "").strip())})
    try:
        cfg = with_knobs(mode, **knobs)
    except KnobError as exc:
        raise input_error(NODE, exc.knob, f"{exc}; {'-1' if exc.knob in FLOAT_KNOBS else 'empty'} takes the "
                          "mode's value") from None
    except ValueError as exc:  # an unknown mode
        raise input_error(NODE, "mode", str(exc)) from None
    changes = {"attention_backend": attention_backend}
    if window is not None:
        changes.update(stream=window.stream, rope_positions=window.rope_positions, kv_cache_fp8=window.kv_cache_fp8)
    return cfg.with_(**changes)


def window_note(mode: str, window: HiStreamWindow | None) -> str | None:
    """A note when a connected Anchor Window Cache turns the mode's sliding window on or off.

    The node's setting wins (that is how the "w/o AGSW" ablation is wired), but a run of "self-forcing" with the
    window on is no longer the baseline it is named after, so the node's text says so.
    """
    if window is None or window.stream.window == mode_config(mode).stream.window:
        return None
    if window.stream.window:
        return (f"Anchor Window Cache turns the sliding window on: mode '{mode}' keeps every past frame, so this run "
                "is not that mode's ablation row (set the window node's enable to 'full cache' or disconnect it)")
    return (f"Anchor Window Cache turns the sliding window off (full cache, the paper's w/o AGSW): mode '{mode}' "
            "alone would use it")


def request_geometry(node: str, width: int, height: int, length: int, cfg: SamplerConfig,
                     patch: int) -> VideoGeometry:
    """The core's size check, its message prefixed with the node and the input it is about."""
    try:
        return video_geometry(width, height, length, cfg, patch)
    except RequestError as exc:
        raise input_error(node, "length" if exc.field == "frames" else exc.field, str(exc)) from None


# -- conditioning ------------------------------------------------------------------------------------------------------
def text_context(positive, text_dim: int, text_len: int, node: str = NODE,
                 input_name: str = "positive") -> tuple[torch.Tensor, list[str]]:
    """ComfyUI Wan CONDITIONING -> the text states the model reads [1, tokens <= text_len, text_dim], and notes.

    ComfyUI's umT5 gives [1, max(512, tokens), 4096] with the padding zeroed, so the prompt's length is the number of
    rows up to the last non-zero one; anything past the model's text length is cut (and the notes say so).
    Errors name ``node`` and its input ``input_name`` (the sampler's positive, or a Prompt Schedule input).
    """
    if not positive or not isinstance(positive[0][0], torch.Tensor):
        raise input_error(node, input_name, "no conditioning: connect a CLIPTextEncode on a CLIPLoader of type 'wan'")
    cond = positive[0][0]
    if cond.ndim != 3 or cond.shape[-1] != text_dim:
        fix = ("encode the prompt with CLIPLoader type 'wan' and umt5_xxl_fp8_e4m3fn_scaled.safetensors"
               + (" (768 wide is CLIP-L, which Wan cannot read)" if cond.shape[-1] == 768 else "")
               if text_dim == WAN_TEXT_DIM else f"this checkpoint reads {text_dim}-wide text states, not umT5-XXL's "
               f"{WAN_TEXT_DIM}: load a Wan2.1 text-to-video checkpoint in HiStream Loader")
        raise input_error(node, input_name, f"the conditioning has shape {tuple(cond.shape)} but the model reads "
                          f"[1, tokens, {text_dim}]; {fix}")
    if not torch.isfinite(cond).all():
        raise input_error(node, input_name, "the conditioning holds NaN or inf values: encode the prompt again; if it "
                          "stays so, the text encoder file is damaged (download it again)")
    used = torch.nonzero(cond[0].abs().amax(dim=-1) > 0)
    if used.numel() == 0:
        raise input_error(node, input_name, "the conditioning is all zeros: encode a prompt with CLIPTextEncode")
    tokens = int(used.max()) + 1
    notes = []
    if len(positive) > 1:
        notes.append(f"using the first of {len(positive)} conditioning entries")
    if cond.shape[0] > 1:
        notes.append(f"using the first of {cond.shape[0]} prompts in the conditioning batch")
    if tokens > text_len:
        notes.append(f"prompt cut: {tokens} tokens, the model reads the first {text_len}")
    for note in notes:
        log.warning("%s: %s", node, note)
    return cond[:1, :min(tokens, text_len)].float(), notes


def scheduled_text(schedule: HiStreamPrompts, first: torch.Tensor, cfg: SamplerConfig, geometry: VideoGeometry,
                   model_cfg) -> tuple[list[tuple[int, torch.Tensor]], list[str]]:
    """The engine's prompt schedule [(first chunk, states)] from the first prompt and the schedule node's prompts."""
    num_chunks = geometry.num_chunks(cfg.stream.chunk_frames)
    try:
        starts = schedule.chunk_starts(cfg.stream.chunk_frames)
    except StoryError as exc:
        fix = (f"start the later one at frame {exc.earliest_frame} or later" if exc.chunk + 1 < num_chunks else
               "this video has no later chunk for it: raise length or disconnect one of them")
        raise input_error(NODE, "prompt_schedule", f"{schedule.start_input(exc.index - 1)} and "
                          f"{schedule.start_input(exc.index)} of {SCHEDULE_NODE} both fall in chunk {exc.chunk + 1}: "
                          f"{fix}") from None
    entries, notes = [(0, first)], []
    for start, conditioning, number in starts:
        if start >= num_chunks:  # a note, not an error: a short test render keeps the schedule attached
            last = chunk_start_frame(num_chunks - 1, cfg.stream.chunk_frames)
            note = (f"{SCHEDULE_NODE}'s positive_{number} (start_frame_{number}, chunk {start + 1}) starts after this "
                    f"{geometry.frames}-frame video's last chunk (frame {last}) and is unused: lower start_frame_"
                    f"{number} or raise length")
            log.warning("%s: %s", NODE, note)
            notes.append(note)
            continue
        states, more = text_context(conditioning, model_cfg.text_dim, model_cfg.text_len, SCHEDULE_NODE,
                                    f"positive_{number}")
        entries.append((start, states))
        notes += more
    return entries, notes


def _named_failures(chunks: Iterator[LatentChunk]) -> Iterator[LatentChunk]:
    """The loop's chunks; a NaN/inf chunk's error names this node (ComfyUI shows the exception's class path)."""
    try:
        yield from chunks
    except NonFiniteLatents as exc:
        raise ValueError(f"{NODE}: {exc}") from None


LATENT_COLORS = "latent colors"  # preview_decoder value: the linear latent -> RGB map, no decoder


class ChunkPreviews:
    """Small RGB images of each finished chunk's last frame: from the latents' linear colours, or decoded with
    TAEHV's preview decoder, which streams along the chunks (it carries one frame per MemBlock)."""

    def __init__(self, decoder, width: int, height: int) -> None:
        self.decoder = decoder
        self.state = decoder.initial_state() if decoder is not None else None
        scale = min(1.0, host.PREVIEW_MAX_SIDE / max(width, height))
        self.size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def __call__(self, latents: torch.Tensor) -> Image.Image:  # model space [B, 16, T, h, w]
        if self.decoder is None:
            rgb = latent_preview(latents[:1, :, -1:], space="normalized", as_uint8=True)[0, 0]  # [h, w, 3]
        else:
            frames, self.state = self.decoder.decode_chunk(denormalize(latents), self.state)
            rgb = (frames_to_images(frames[:1, :, -1:])[0] * 255).round().to(torch.uint8)  # [h, w, 3]
        return Image.fromarray(rgb.cpu().numpy()).resize(self.size, Image.BILINEAR)


# -- the node ----------------------------------------------------------------------------------------------------------
def _override(kind: str, default, tooltip: str, **limits):
    return (kind, {"default": default, "tooltip": tooltip, **limits})


class HiStreamDualResSampler:
    @classmethod
    def INPUT_TYPES(cls):
        modes = {name: knob_values(cfg) for name, cfg in MODES.items()}  # web/histream.js greys unused knobs
        return {
            "required": {
                "model": ("HISTREAM_MODEL", {"tooltip": "From HiStream Loader."}),
                "positive": ("CONDITIONING", {"tooltip": (
                    "The prompt from CLIPTextEncode on a CLIPLoader of type 'wan' (umT5-XXL). Prompts longer than "
                    "the model's 512 tokens are cut (the node says so).")}),
                "width": ("INT", {"default": 1920, "min": 32, "max": 4096, "step": 32, "tooltip": (
                    "Video width in pixels, a multiple of 32: dual-resolution caching runs the low-res passes at "
                    "half size on 16-pixel tokens.")}),
                "height": ("INT", {"default": 1088, "min": 32, "max": 4096, "step": 32, "tooltip": (
                    "Video height in pixels, a multiple of 32; 1088 for 1080p.")}),
                "length": ("INT", {"default": 81, "min": 1, "max": 10001, "step": 4, "tooltip": (
                    "Frames, 4k+1 (81 = 5 s at 16 fps). Time and memory per chunk stay flat with the sliding "
                    "window, so long videos cost only time.")}),
                "mode": (list(MODES), {"default": "histream", "histream_modes": modes, "tooltip": (
                    "histream: 2 low-res + 2 high-res steps per chunk. histream+: 4 steps on the first chunk, 2 "
                    "after. self-forcing: the baseline (full resolution, full cache). no-drc / no-agsw / two-step: "
                    "the paper's ablations.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; each chunk's noise depends only on (seed, chunk)."}),
            },
            "optional": {
                "window": ("HISTREAM_WINDOW", {"tooltip": (
                    "From Anchor Window Cache; without it the mode's window (anchor 1 + local 2, or the full cache "
                    "of self-forcing and no-agsw).")}),
                "prompt_schedule": ("HISTREAM_PROMPTS", {"tooltip": (
                    "From HiStream Prompt Schedule: later prompts taking over at given frames (positive is the "
                    "first prompt).")}),
                "low_res_scale": _override("FLOAT", MODE_VALUE, (
                    "Size of the low-resolution passes relative to the video (0.5: 960x544 for 1080p). -1: the "
                    "mode's."), min=-1.0, max=1.0, step=0.05),
                "shift": _override("FLOAT", MODE_VALUE, (
                    "Timestep shift of the few-step schedule (7 at 1080p, Self-Forcing's 5 at 480p). -1: the mode's."),
                    min=-1.0, max=20.0, step=0.1),
                "ntk_factor_high": _override("FLOAT", MODE_VALUE, (
                    "NTK RoPE factor of the spatial axes in the full-resolution passes (paper: 5 at 1080p). -1: the "
                    "mode's."), min=-1.0, max=20.0, step=0.1),
                "ntk_factor_low": _override("FLOAT", MODE_VALUE, (
                    "NTK RoPE factor of the spatial axes in the low-resolution passes (paper: 2). -1: the mode's."),
                    min=-1.0, max=20.0, step=0.1),
                "first_chunk_attn_coef": _override("FLOAT", MODE_VALUE, (
                    "Attention scaling coefficient of the first chunk's full-resolution passes (paper: 2; 1 = off). "
                    "-1: the mode's."), min=-1.0, max=10.0, step=0.1),
                "first_chunk_steps": _override("STRING", "", (
                    f"Steps of the first chunk as base timesteps, e.g. {STEPS_EXAMPLE}. Empty: the mode's.")),
                "later_chunk_steps": _override("STRING", "", (
                    "Steps of every later chunk (HiStream+: '1000|500'). Empty: the mode's.")),
                "preview_decoder": ([LATENT_COLORS, *host.model_files("vae_approx")], {"tooltip": (
                    "How each finished chunk is previewed: the latents' colours, or a TAEHV file from "
                    "models/vae_approx (taew2_1.safetensors) decoded cheaply into a sharp small frame.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"
    CATEGORY = "HiStream"
    DESCRIPTION = ("HiStream streaming text-to-video: chunk by chunk, with dual-resolution caching, an anchor-guided "
                   "sliding window and asymmetric denoising. Returns the Wan latents of the whole video.")

    def sample(self, model: HiStreamModel, positive, width, height, length, mode, seed, window=None,
               prompt_schedule: HiStreamPrompts | None = None, preview_decoder: str = LATENT_COLORS, unique_id=None,
               **overrides):
        cfg = build_config(mode, window, model.attention_backend, **overrides)
        dit = model.model
        geometry = request_geometry(NODE, width, height, length, cfg, dit.cfg.patch_size[1])
        context, notes = text_context(positive, dit.cfg.text_dim, dit.cfg.text_len)
        text = context
        if prompt_schedule is not None:
            cfg = cfg.with_(kv_recache=prompt_schedule.kv_recache, recache_anchor=prompt_schedule.recache_anchor)
            text, more_notes = scheduled_text(prompt_schedule, context, cfg, geometry, dit.cfg)
            notes += more_notes
        if (note := window_note(mode, window)) is not None:
            log.warning("%s: %s", NODE, note)
            notes.append(note)
        if (warning := untrained_positions(geometry, cfg)) is not None:  # the engine logs it; artists read the node
            notes.append(warning)
        device = model.device
        previews = ChunkPreviews(None if preview_decoder == LATENT_COLORS else cached_tiny_decoder(
            preview_decoder, dit.compute_dtype, NODE, "preview_decoder", preview=True, device=device), width, height)
        host.make_room(device)
        bar, total_calls = None, 0  # the bar is made at the first model call, which reports how many calls it takes

        def on_progress(p):
            nonlocal bar, total_calls
            if bar is None:
                bar, total_calls = host.progress_bar(p.total_calls, unique_id), p.total_calls
            bar.update_absolute(p.call, p.total_calls)
            host.send_event("histream.progress", {
                "node": unique_id, "chunk": p.chunk + 1, "num_chunks": p.num_chunks, "call": p.call,
                "total_calls": p.total_calls, "kind": p.kind, "timestep": p.timestep,
                "cached_frames": p.cached_frames})

        chunks, seconds, calls = [], 0.0, 0
        with torch.no_grad(), out_of_memory_advice(width, height, (
                "use fp8 weights (HiStream Loader weight_dtype fp8_e4m3fn), keep the sliding window on, store the "
                "caches in fp8 (Anchor Window Cache kv_cache_dtype), or lower the resolution")):
            if isinstance(text, torch.Tensor):
                text = text.to(device)
            else:
                text = [(start, states.to(device)) for start, states in text]
            for chunk in _named_failures(stream_video(dit, text, width, height, length, cfg, seed,
                                                      on_progress=on_progress, should_stop=host.raise_if_interrupted)):
                chunks.append(denormalize(chunk.latents).to(host.output_device()))
                seconds += chunk.seconds
                calls += chunk.model_calls
                bar.update_absolute(calls, total_calls, preview=(
                    "JPEG", previews(chunk.latents), host.PREVIEW_MAX_SIDE))
        summary = (f"{mode}: {len(chunks)} chunks, {calls} model calls, {seconds:.1f} s "
                   f"({1000 * seconds / length:.0f} ms/frame)")
        log.info("%s: %s", NODE, summary)
        return {"ui": {"text": [summary, *notes]}, "result": ({"samples": torch.cat(chunks, dim=2)},)}
