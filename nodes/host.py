"""Everything the nodes need from ComfyUI, in one place.

The host modules (``comfy.*``, ``folder_paths``, ``server``) are imported inside the functions: the pack must import
without ComfyUI (unit tests, ``python -c``), and they exist only once the host has started.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 512  # pixels; what ComfyUI's own previews use by default


def main_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def output_device() -> torch.device:
    """Where ComfyUI keeps LATENT and IMAGE tensors between nodes (the CPU unless told otherwise)."""
    import comfy.model_management as mm

    return mm.intermediate_device()


def raise_if_interrupted() -> bool:
    """The core's ``should_stop`` hook: raises ComfyUI's own interrupt exception, so the run ends as "interrupted"."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    return False


def make_room(device: torch.device) -> None:
    """Unload the models ComfyUI manages (the text encoder has done its work by now): our model is not one of them,
    so the host cannot free memory for it on its own."""
    if device.type == "cpu":
        return
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def progress_bar(total: int, node_id: str | None):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id)


def send_event(event: str, data: dict) -> None:
    """Send a message to the browser (read by web/histream.js); a no-op where no server runs."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def model_files(folder: str) -> list[str]:
    """The files of one of ComfyUI's model folders ("diffusion_models", "vae_approx", ...)."""
    import folder_paths

    return folder_paths.get_filename_list(folder)


def model_path(folder: str, name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(folder, name)


def new_output_file(prefix: str, width: int, height: int, suffix: str) -> tuple[Path, str, list[Path]]:
    """A fresh path under ComfyUI's output folder, numbered as ComfyUI's save nodes do, its subfolder, and the
    folders ComfyUI made for it (innermost first), which the caller removes if the file is never written.

    ComfyUI's path helper makes missing folders without saying which; they are known when the prefix names its
    folder literally (with %date%-style variables in the folder part they are left, as ComfyUI's own nodes do)."""
    import folder_paths

    output = Path(folder_paths.get_output_directory())
    named = output / os.path.dirname(os.path.normpath(prefix))
    missing = [f for f in (named, *named.parents) if output in f.parents and not f.exists()]
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, str(output), width, height)
    return Path(folder) / f"{name}_{counter:05}_{suffix}", subfolder, missing if Path(folder) == named else []
