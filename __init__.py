"""ComfyUI entry point of the HiStream node pack.

ComfyUI imports this file under a path-derived module name, so everything below is imported relatively; the
engine (histream_core) never imports ComfyUI, and the nodes import the host's modules only when they run.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
