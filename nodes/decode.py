"""VAE Chunk Decode: Wan latents -> frames with the core's streaming (cache-in, cache-out) decoder.

The stock VAE input (wan_2.1_vae from "Load VAE") is rebuilt once as the core's WanVAE, from the weights ComfyUI
already holds, and kept for as long as ComfyUI keeps that VAE. Chunked decode equals whole-video decode, so memory
stays at one chunk; with ``save_mp4`` the frames go straight to an mp4 and only a small preview is returned, so a
video of any length decodes at constant memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F

from ..histream_core.pipeline import TILES_ARE_FOR_THE_VAE
from ..histream_core.vae import (NonFiniteFrames, TiledDecoder, TinyWanDecoder, VAECheckpointError, WanVAE,
                                 check_finite_frames, frames_to_images, load_tiny_decoder)
from ..histream_core.vae import checkpoints as vae_checkpoints
from ..histream_core.vae.latent_format import LATENT_CHANNELS
from ..histream_core.vae.tiling import SMALLEST_USEFUL_TILE
from ..histream_core.video import (VideoWriter, check_crf, check_fps, check_video_path, ffmpeg_exe, made_folders,
                                   remove_empty_folders)
from . import host
from .errors import input_error, out_of_memory_advice

log = logging.getLogger(__name__)

NODE = "VAE Chunk Decode"
CHUNK_LATENT_FRAMES = 3  # latent frames per decode call (12 video frames): the sampler's chunk
MIN_TILE_PX = 8 * SMALLEST_USEFUL_TILE  # 64 px
_streaming_vaes: WeakKeyDictionary = WeakKeyDictionary()  # ComfyUI VAE object -> its WanVAE
_tiny_decoders: dict[tuple, TinyWanDecoder] = {}  # (path, mtime, dtype, preview, device) -> decoder; at most two
NO_TINY_DECODER = "none"


def streaming_vae(vae) -> WanVAE:
    """The core's WanVAE for a ComfyUI VAE object, built from its weights on first use and cached by identity."""
    stage = getattr(vae, "first_stage_model", None)
    if stage is None:
        raise input_error(NODE, "vae", f"expected a ComfyUI VAE from Load VAE, got {type(vae).__name__}")
    cached = _streaming_vaes.get(vae)
    if cached is None:
        try:
            cached = vae_checkpoints.vae_from_state_dict(
                stage.state_dict(), source="the 'vae' input", device=getattr(vae, "device", None) or host.main_device(),
                dtype=getattr(vae, "vae_dtype", torch.float32))
        except VAECheckpointError as exc:
            raise input_error(NODE, "vae", f"{exc}; load wan_2.1_vae.safetensors with Load VAE") from exc
        _streaming_vaes[vae] = cached
    return cached


def cached_tiny_decoder(name: str, dtype: torch.dtype, node: str = NODE, input_name: str = "tiny_decoder",
                        preview: bool = False, device: torch.device | None = None) -> TinyWanDecoder:
    """The TAEHV decoder (or its preview variant) of models/vae_approx/``name``, loaded once (again if the file
    changes); a bad file is an error of ``node``'s input ``input_name``."""
    path = host.model_path("vae_approx", name)
    device = device or host.main_device()
    key = (path, os.path.getmtime(path), dtype, preview, device)
    if key not in _tiny_decoders:
        try:
            decoder = load_tiny_decoder(path, device=device, dtype=dtype, preview=preview)
        except ValueError as exc:
            raise input_error(node, input_name, str(exc)) from exc
        if len(_tiny_decoders) >= 2:
            _tiny_decoders.clear()
        _tiny_decoders[key] = decoder
    return _tiny_decoders[key]


def decode_with_progress(decoder, latents: torch.Tensor, bar) -> Iterator[torch.Tensor]:
    """Frames [B, 3, t, H, W] in [-1, 1], chunk by chunk. The decoder's stream owns its causal caches, so the
    previous chunk's are freed as the next one uses them.

    An interrupt is checked before each chunk and, with tiles, before each pass of each tile: a tiled decode works
    through a segment of up to 7 chunks tile by tile before any of its frames come out, so the bar also moves
    between chunks (in percent of a chunk)."""
    starts = range(0, latents.shape[2], CHUNK_LATENT_FRAMES)
    done, shown = 0, 0  # chunks whose frames are out; the bar's value (in percent of a chunk), never going back

    def show(value: int) -> None:
        nonlocal shown
        shown = max(shown, value)
        bar.update_absolute(shown, 100 * len(starts))

    def before_pass(fraction: float, chunks: int) -> None:
        host.raise_if_interrupted()
        show(round(100 * (done + chunks * fraction)))

    def pieces():
        for start in starts:
            host.raise_if_interrupted()
            yield latents[:, :, start:start + CHUNK_LATENT_FRAMES]

    if isinstance(decoder, TiledDecoder):
        decoder.before_pass = before_pass  # the node makes a fresh TiledDecoder for every decode
    for frames in decoder.decode_stream(pieces()):
        done += 1
        show(100 * done)
        try:
            check_finite_frames(frames, done)
        except NonFiniteFrames as exc:  # ComfyUI would show the exception's class path; this names the node
            raise ValueError(f"{NODE}: {exc}") from None
        yield frames


def check_tile_size(node: str, name: str, tile_size: int) -> None:
    """0 (whole frames) or whole latent pixels, at least 64 px: smaller tiles lose too much context at their edges."""
    if tile_size and (tile_size < MIN_TILE_PX or tile_size % 8):
        raise input_error(node, name, f"{tile_size} is not a tile size: use 0 (whole frames) or a multiple of 8 of at "
                          f"least {MIN_TILE_PX} px; 512 fits a 1080p decode in about 4 GiB")


def _check_ffmpeg() -> None:
    try:
        ffmpeg_exe()
    except ImportError:
        raise input_error(NODE, "save_mp4", "writing mp4 needs the imageio-ffmpeg package: run pip install -r "
                          "requirements.txt in this node pack's folder (ComfyUI-Manager does it on install), or "
                          "turn save_mp4 off and save with Create Video + Save Video") from None
    except FileNotFoundError as exc:
        raise input_error(NODE, "save_mp4", f"{exc}; or turn save_mp4 off and save with Create Video + Save "
                          "Video") from None


def mp4_path(prefix: str, width: int, height: int, fps: float, crf: int) -> tuple[Path, str, list[Path]]:
    """The numbered mp4 path under the output folder for ``prefix`` (checked), its subfolder, and the folders ComfyUI
    made for it (to go again if the mp4 is not written)."""
    if not prefix.strip():
        raise input_error(NODE, "filename_prefix", "empty: give a name such as HiStream/video")
    if "\0" in prefix:
        raise input_error(NODE, "filename_prefix", "it holds a NUL character, which no file name can: remove it")
    for name, check in (("fps", lambda: check_fps(fps)), ("crf", lambda: check_crf(crf))):
        try:
            check()
        except ValueError as exc:
            raise input_error(NODE, name, str(exc)) from None
    made = []
    try:
        path, subfolder, made = host.new_output_file(prefix, width, height, ".mp4")
        check_video_path(path, fps, crf, folder_may_be_missing=True)
    except Exception as exc:  # ComfyUI refuses paths outside the output folder with a bare "**** ERROR: ..."
        remove_empty_folders(made)
        reason = str(exc).strip().splitlines()[0].strip("* ").removeprefix("ERROR: ")
        raise input_error(NODE, "filename_prefix", f"{prefix!r} cannot name a file in the output folder "
                          f"({reason}); use a short relative name such as HiStream/video") from None
    return path, subfolder, made


def small(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [N, H, W, 3] shrunk to fit host.PREVIEW_MAX_SIDE (never enlarged)."""
    height, width = images.shape[1:3]
    scale = min(1.0, host.PREVIEW_MAX_SIDE / max(height, width))
    if scale == 1.0:
        return images
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)


class HiStreamVAEChunkDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "Wan video latents, e.g. from HiStream Dual-Res Sampler."}),
                "vae": ("VAE", {"tooltip": "The Wan2.1 VAE from Load VAE (wan_2.1_vae.safetensors)."}),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip": (
                    "Decode in spatial tiles of this many pixels to save GPU memory; 0 = whole frames. 512 fits "
                    "1080p on small GPUs.")}),
                "tile_overlap": ("INT", {"default": 128, "min": 0, "max": 1024, "step": 32, "tooltip": (
                    "Pixels shared by neighbouring tiles, blended to hide seams; must be smaller than tile_size.")}),
                "save_mp4": ("BOOLEAN", {"default": False, "label_on": "stream to mp4", "label_off": "return frames",
                                         "tooltip": (
                    "Write the frames straight into an mp4 in ComfyUI's output folder as they are decoded (constant "
                    "memory for any length) and return only a small preview (every preview_every-th frame, at most "
                    "512 px): not a video to save again with Save Video.")}),
                "filename_prefix": ("STRING", {"default": "HiStream/video", "tooltip": (
                    "mp4 name under the output folder (with save_mp4).")}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": (
                    "Frame rate of the mp4; Wan2.1 generates 16 fps.")}),
                "crf": ("INT", {"default": 19, "min": 0, "max": 51, "step": 1, "tooltip": (
                    "H.264 quality of the mp4: lower is better and larger (19 is visually lossless).")}),
                "preview_every": ("INT", {"default": 4, "min": 1, "max": 1000, "step": 1, "tooltip": (
                    "With save_mp4: the returned preview keeps every Nth frame, shrunk to 512 px.")}),
            },
            "optional": {
                "tiny_decoder": ([NO_TINY_DECODER, *host.model_files("vae_approx")], {"tooltip": (
                    "Decode with TAEHV's tiny decoder (taew2_1.safetensors in models/vae_approx) instead of the "
                    "VAE: about 25x less compute, lower quality; for drafts and previews.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "mp4_path")
    OUTPUT_TOOLTIPS = ("All frames, or with save_mp4 a small preview (every Nth frame).",
                       "Path of the written mp4 (empty without save_mp4).")
    FUNCTION = "decode"
    OUTPUT_NODE = True  # with save_mp4 it is the node that writes the file, even with nothing connected after it
    CATEGORY = "HiStream"
    DESCRIPTION = ("Decodes Wan latents chunk by chunk with the streaming Wan2.1 VAE (or TAEHV's tiny decoder); "
                   "optionally straight to an mp4.")

    def decode(self, samples, vae, tile_size, tile_overlap, save_mp4, filename_prefix, fps, crf, preview_every,
               tiny_decoder=NO_TINY_DECODER, unique_id=None):
        latents = samples["samples"]
        if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
            raise input_error(NODE, "samples", f"expected Wan video latents [batch, {LATENT_CHANNELS}, frames, H/8, "
                              f"W/8], got shape "
                              f"{tuple(latents.shape)}: connect a Wan video LATENT (e.g. HiStream Dual-Res Sampler)")
        if not torch.isfinite(latents).all():
            raise input_error(NODE, "samples", "the latents hold NaN or inf values, so every frame would be black: "
                              "regenerate them (the node that made them says why, e.g. a NaN conditioning)")
        check_tile_size(NODE, "tile_size", tile_size)
        if tile_overlap % 8:
            raise input_error(NODE, "tile_overlap", f"{tile_overlap} is not a multiple of 8 (one latent pixel); use "
                              f"{tile_overlap // 8 * 8} or {tile_overlap // 8 * 8 + 8}")
        if tile_size and 2 * tile_overlap > tile_size:  # 480 of 512 decoded each pixel ~100 times over
            raise input_error(NODE, "tile_overlap", f"{tile_overlap} is more than half of tile_size {tile_size}: each "
                              "pixel would be decoded many times over; use at most "
                              f"{tile_size // 2 // 8 * 8} (64 is plenty)")
        if save_mp4:
            _check_ffmpeg()
        if save_mp4 and latents.shape[0] != 1:
            raise input_error(NODE, "save_mp4", f"an mp4 holds one video, the latents hold {latents.shape[0]}; "
                              "decode without save_mp4 or split the batch")
        if tiny_decoder != NO_TINY_DECODER:
            if tile_size:
                raise input_error(NODE, "tile_size", f"{TILES_ARE_FOR_THE_VAE}: set tile_size to 0")
            decoder = cached_tiny_decoder(tiny_decoder, getattr(vae, "vae_dtype", torch.float32))
        else:
            model = streaming_vae(vae)
            decoder = TiledDecoder(model, tile=tile_size // 8, overlap=tile_overlap // 8) if tile_size else model
        height, width = (8 * s for s in latents.shape[3:])
        # decode_with_progress sets the bar's total
        bar = host.progress_bar(-(-latents.shape[2] // CHUNK_LATENT_FRAMES), unique_id)
        with torch.no_grad(), out_of_memory_advice(width, height, (
                "set tile_size (e.g. 512) in VAE Chunk Decode, use fp8 weights in HiStream Loader, or lower the "
                "resolution")):
            if not save_mp4:
                videos = [frames_to_images(f).unflatten(0, (latents.shape[0], -1)).to(host.output_device())
                          for f in decode_with_progress(decoder, latents, bar)]
                return {"result": (torch.cat(videos, dim=1).flatten(0, 1), "")}
            path, subfolder, made = mp4_path(filename_prefix, width, height, fps, crf)
            previews, written = [], 0
            with made_folders(path.parent, made), VideoWriter(path, fps=fps, crf=crf) as writer:
                for frames in decode_with_progress(decoder, latents, bar):
                    writer.write(frames)
                    images = frames_to_images(frames)
                    first = -written % preview_every  # index in this chunk of the next frame to keep
                    previews.append(small(images[first::preview_every]).to(host.output_device()))
                    written += images.shape[0]
        log.info("%s: wrote %s (%d frames)", NODE, path, written)
        ui = {"images": [{"filename": path.name, "subfolder": subfolder, "type": "output"}], "animated": (True,)}
        return {"ui": ui, "result": (torch.cat(previews), str(path))}
