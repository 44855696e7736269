"""Stand-ins for the ComfyUI modules the nodes call (CI has no ComfyUI), and the pack imported as ComfyUI does.

``comfy_host`` puts ``comfy``, ``comfy.utils``, ``comfy.model_management``, ``folder_paths`` and ``server`` into
``sys.modules`` for one test, with folders under ``tmp_path``; the returned ``Host`` records progress updates and
browser events and can raise ComfyUI's interrupt after a given number of progress updates, as the real host does
(every ``ProgressBar`` update is an interrupt point there).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# ComfyUI 0.3.x names a pack's module after its folder path, dots replaced (nodes.py, load_custom_node).
PACK_MODULE = str(ROOT).replace(".", "_x_")


def load_pack() -> types.ModuleType:
    """The repo root's ``__init__.py`` imported exactly as ComfyUI imports a custom-node folder."""
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_MODULE]


def pack_module(name: str) -> types.ModuleType:
    """A submodule of the loaded pack, e.g. ``pack_module("histream_core.sampler")``."""
    load_pack()
    return sys.modules[f"{PACK_MODULE}.{name}"]


class InterruptProcessingException(Exception):
    """comfy.model_management's exception for a user interrupt."""


class Host:
    def __init__(self, root: Path) -> None:
        self.models = root / "models"
        self.output = root / "output"
        for folder in ("diffusion_models", "vae", "vae_approx"):
            (self.models / folder).mkdir(parents=True)
        self.output.mkdir()
        self.progress: list[tuple[int, int, object]] = []  # (value, total, preview) per ProgressBar update
        self.events: list[tuple[str, dict]] = []
        self.interrupt_after: int | None = None  # interrupt once this many progress updates have happened
        self.interrupted = False

    def throw_if_interrupted(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise InterruptProcessingException()

    def modules(self) -> dict[str, types.ModuleType]:
        host = self
        comfy = types.ModuleType("comfy")
        utils = types.ModuleType("comfy.utils")
        mm = types.ModuleType("comfy.model_management")
        folder_paths = types.ModuleType("folder_paths")
        server = types.ModuleType("server")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.node_id = total, node_id

            def update_absolute(self, value, total=None, preview=None):
                self.total = total if total is not None else self.total
                host.progress.append((value, self.total, preview))
                if host.interrupt_after is not None and len(host.progress) >= host.interrupt_after:
                    host.interrupted = True
                host.throw_if_interrupted()

        utils.ProgressBar = ProgressBar
        mm.InterruptProcessingException = InterruptProcessingException
        mm.throw_exception_if_processing_interrupted = host.throw_if_interrupted
        mm.processing_interrupted = lambda: host.interrupted
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.soft_empty_cache = lambda force=False: None
        mm.unload_all_models = lambda: None
        comfy.utils, comfy.model_management = utils, mm

        def get_filename_list(kind):
            return sorted(p.name for p in (host.models / kind).iterdir())

        def get_full_path_or_raise(kind, name):
            path = host.models / kind / name
            if not path.is_file():
                raise FileNotFoundError(f"Model in folder '{kind}' with filename '{name}' not found.")
            return str(path)

        def get_save_image_path(prefix, output_dir, width=0, height=0):
            subfolder, name = os.path.split(os.path.normpath(prefix))
            folder = os.path.join(output_dir, subfolder)
            if os.path.commonpath((output_dir, os.path.abspath(folder))) != output_dir:  # as ComfyUI 0.3.64 refuses
                raise Exception("**** ERROR: Saving image outside the output folder is not allowed.\n"
                                f" full_output_folder: {os.path.abspath(folder)}")
            os.makedirs(folder, exist_ok=True)
            counter = 1 + sum(1 for f in os.listdir(folder) if f.startswith(name + "_"))
            return folder, name, counter, subfolder, prefix

        folder_paths.get_filename_list = get_filename_list
        folder_paths.get_full_path_or_raise = get_full_path_or_raise
        folder_paths.get_output_directory = lambda: str(host.output)
        folder_paths.get_save_image_path = get_save_image_path

        class PromptServer:
            instance = None

            def __init__(self):
                self.client_id = "test-client"

            def send_sync(self, event, data, sid=None):
                host.events.append((event, data))

        PromptServer.instance = PromptServer()
        server.PromptServer = PromptServer
        return {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm, "folder_paths": folder_paths,
                "server": server}


@pytest.fixture
def comfy_host(monkeypatch, tmp_path) -> Host:
    host = Host(tmp_path)
    for name, module in host.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return host
