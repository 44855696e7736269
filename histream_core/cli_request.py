"""The generate request, checked before any model file is read (loading one takes minutes): sizes, the mode's
knobs, the output, the files a run needs, options that would be ignored, --text-embeds against the model, and the
--schedule story. ``bench`` and ``memory`` share the config and flag checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import MODEL_PRESETS, ModelConfig, SamplerConfig
from .model.attention import check_backend_runs
from .model.layers import check_fp8_matmul
from .modes import KNOBS, KnobError, with_knobs
from .pipeline import TILES_ARE_FOR_THE_VAE, checked_device
from .sampler import VideoGeometry, check_prompt_starts, chunk_start_frame, story_chunks, video_geometry
from .vae.tiling import SMALLEST_USEFUL_TILE
from .video import check_video_path

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flag(knob: str) -> str:
    return "--" + knob.replace("_", "-")


def given_flags(args, *names: str) -> list[str]:
    """The flags among ``names`` that the command line (or its config file) gave."""
    return [flag(name) for name in names if getattr(args, name) is not None]


def sampler_config(args, mode: str | None = None):
    """The mode's configuration with the command line's knobs and switches applied (KnobError names the flag)."""
    mode = mode or args.mode
    knobs = {knob: value for knob in KNOBS if (value := getattr(args, knob, None)) is not None}
    try:
        cfg = with_knobs(mode, **knobs)
    except KnobError as exc:
        raise ValueError(f"{flag(exc.knob)}: {exc}") from None
    changes = {}
    if args.rope_positions is not None:
        changes["rope_positions"] = args.rope_positions
    if args.attention is not None:
        changes["attention_backend"] = args.attention
    if args.kv_cache_fp8:
        changes["kv_cache_fp8"] = True
    window = {name: value for name in ("chunk_frames", "anchor_frames", "local_frames")
              if (value := getattr(args, name, None)) is not None}
    if args.no_window:
        window["window"] = False
    if window:
        try:
            changes["stream"] = replace(cfg.stream, **window)
        except ValueError as exc:
            raise ValueError(f"{', '.join(flag(name) for name in window if name != 'window')}: {exc}") from None
        sizes = [flag(name) for name in ("anchor_frames", "local_frames") if name in window]
        if sizes and not changes["stream"].window:
            why = "--no-window is given" if args.no_window else f"mode '{mode}' keeps every past frame (no AGSW)"
            raise ValueError(f"{', '.join(sizes)}: the sliding window is off ({why}), so the cache keeps every frame; "
                             "drop the flag or use a mode with the window")
    return cfg.with_(**changes)


EMBEDDED_SIZE = (256, 160, 33)   # width, height, frames of the embedded default
EMBEDDED_PROMPT = "a red fox running through snow, cinematic"
CHECKPOINT_SIZE = (1920, 1088, 81)


@dataclass(frozen=True)
class Request:
    """A generate request that passed every check that needs no model file."""

    device: torch.device
    dtype: torch.dtype
    geometry: VideoGeometry
    cfg: SamplerConfig
    starts: list[tuple[int, str]]  # later prompts: (first chunk, prompt)
    out: Path
    text_embeds: torch.Tensor | None  # --text-embeds, read and checked against the model


def check_tile(tile: int | None) -> None:
    if tile and tile < SMALLEST_USEFUL_TILE:
        raise ValueError(f"--tile must be at least {SMALLEST_USEFUL_TILE} latent pixels (smaller tiles lose too much "
                         f"context at their edges), got {tile}; 64 (512 px) decodes 1080p in about 4 GiB")


def check_fp8_matmul_flag(args, device: torch.device | None) -> None:
    """--fp8-matmul needs bf16 activations, and (when ``device`` is given) a device that multiplies fp8 per row."""
    if not args.fp8_matmul:
        return
    if args.dtype != "bf16":
        raise ValueError(f"--fp8-matmul quantizes bf16 activations, and this run computes in {args.dtype}: add "
                         "--dtype bf16 (the default on CUDA)")
    if device is not None:
        check_fp8_matmul(device)


def checked_request(args) -> Request:
    """Everything that can be checked without the model files, checked first: loading them takes minutes."""
    device = checked_device(args.device)
    dtype = DTYPES[args.dtype]
    width, height, frames = (given if given is not None else default for given, default in zip(
        (args.width, args.height, args.frames), EMBEDDED_SIZE if args.checkpoint is None else CHECKPOINT_SIZE))
    cfg = sampler_config(args)
    geometry = video_geometry(width, height, frames, cfg)
    if args.later_chunk_steps is not None and geometry.num_chunks(cfg.stream.chunk_frames) == 1:
        log.warning("--later-chunk-steps is unused: this %d-frame video is one chunk (the first chunk's steps are "
                    "--first-chunk-steps)", frames)
    if args.tile and args.tiny_decoder:
        raise ValueError(f"{TILES_ARE_FOR_THE_VAE} (drop --tile)")
    check_tile(args.tile)
    check_fp8_matmul_flag(args, device)
    starts = schedule_starts(args, geometry, cfg.stream.chunk_frames)
    out = check_video_path(args.out, args.fps, folder_may_be_missing=True)
    check_files(args)
    if args.attention:
        check_backend_runs(args.attention, device, dtype)
    text_embeds = checked_text_embeds(args.text_embeds, args.checkpoint, MODEL_PRESETS["tiny"])
    return Request(device, dtype, geometry, cfg, starts, out, text_embeds)


def checked_text_embeds(path: str | None, checkpoint: str | None, default: ModelConfig) -> torch.Tensor | None:
    """--text-embeds, read and held against the model's text width and length before any model file loads (a
    checkpoint takes minutes): the checkpoint's header tells them, or ``default`` (the built-in model's config)."""
    if path is None:
        return None
    from .checkpoints import inspect_checkpoint
    from .text import load_text_embeddings

    states = load_text_embeddings(path)
    model = default if checkpoint is None else inspect_checkpoint(checkpoint)["config"]
    reader = "the built-in model" if checkpoint is None else f"--checkpoint {Path(checkpoint).name}"
    if states.shape[-1] != model.text_dim:
        raise ValueError(f"--text-embeds {path} holds {states.shape[-1]}-wide text states, and {reader} reads "
                         f"{model.text_dim}-wide ones: save the states of the text encoder it was trained with "
                         "(umT5-XXL for Wan2.1)")
    if states.shape[1] > model.text_len:
        raise ValueError(f"--text-embeds {path} holds {states.shape[1]} tokens, and {reader} reads at most "
                         f"{model.text_len}: keep the first {model.text_len} (umT5 encoders cut prompts there)")
    return states


def check_files(args) -> None:
    """Which files a run needs, that they are there, and options that would be silently ignored."""
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text the video should follow")
    if args.text_embeds is not None:
        ignored = given_flags(args, "prompt", "text_encoder", "tokenizer", "text_cache")
        if ignored:
            raise ValueError(f"--text-embeds already holds the prompt's states, so {', '.join(ignored)} would be "
                             "ignored: drop them, or drop --text-embeds to encode a --prompt")
    if args.checkpoint is None:
        ignored = given_flags(args, "vae", "text_encoder", "tokenizer", "text_cache")
        if ignored:
            raise ValueError(f"{', '.join(ignored)} {'needs' if len(ignored) == 1 else 'need'} --checkpoint: the "
                             "embedded default has its own random VAE and stand-in text states (pass --checkpoint "
                             "with them, or drop them)")
    else:
        if args.vae is None and args.tiny_decoder is None:
            raise ValueError("with --checkpoint also pass --vae (wan_2.1_vae.safetensors), or --tiny-decoder "
                             "(taew2_1.safetensors) for fast drafts")
        if args.vae is not None and args.tiny_decoder is not None:
            raise ValueError("pass --vae or --tiny-decoder, not both: one of them decodes the video")
        if args.text_embeds is None and (args.text_encoder is None or args.prompt is None):
            raise ValueError("with --checkpoint pass --text-encoder (umt5_xxl_fp16.safetensors) and --prompt, "
                             "or --text-embeds (precomputed umT5 states)")
        if args.schedule and args.text_encoder is None:
            raise ValueError("--schedule needs --text-encoder (and --tokenizer) to encode its prompts; with "
                             "--text-embeds alone only the first prompt is known")
    for name in ("checkpoint", "vae", "tiny_decoder", "text_encoder", "text_embeds", "tokenizer"):
        given = getattr(args, name)
        if given is not None and not Path(given).is_file() and not (name == "tokenizer" and Path(given).is_dir()):
            what = "is a folder; give the file inside it" if Path(given).is_dir() else "does not exist"
            raise FileNotFoundError(f"{flag(name)} {given} {what}")


def schedule_starts(args, geometry, chunk_frames: int) -> list[tuple[int, str]]:
    """--schedule FRAME:PROMPT ... -> [(first chunk, prompt)] after the --prompt, checked against the video."""
    frames, prompts = [], []
    for item in args.schedule or ():
        frame, sep, prompt = item.partition(":")
        if not sep or not frame.strip().isdigit() or not prompt.strip():
            raise ValueError(f"--schedule {item!r}: write FRAME:PROMPT, e.g. --schedule '48:the fox jumps'")
        if int(frame) == 0:
            raise ValueError(f"--schedule {item!r}: frame 0 belongs to --prompt (the video starts with it); give that "
                             f"prompt with --prompt, and later ones at later frames (the next chunk starts at frame "
                             f"{chunk_start_frame(1, chunk_frames)})")
        frames.append(int(frame))
        prompts.append(prompt)
    try:
        starts = story_chunks([0, *frames], chunk_frames)[1:]  # the --prompt's at frame 0, then these in order
        check_prompt_starts(starts, geometry, chunk_frames)
    except ValueError as exc:  # a RequestError too
        raise ValueError(f"--schedule: {exc}") from None
    return list(zip(starts, prompts))
