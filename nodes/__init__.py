"""ComfyUI nodes over histream_core: declare inputs, validate, call the core, wrap the outputs."""

from .decode import HiStreamVAEChunkDecode
from .loader import HiStreamLoader
from .readout import HiStreamCostReadout
from .sampler import HiStreamDualResSampler
from .schedule import HiStreamPromptSchedule
from .window import HiStreamAnchorWindow

NODE_CLASS_MAPPINGS = {
    "HiStreamLoader": HiStreamLoader,
    "HiStreamAnchorWindow": HiStreamAnchorWindow,
    "HiStreamDualResSampler": HiStreamDualResSampler,
    "HiStreamVAEChunkDecode": HiStreamVAEChunkDecode,
    "HiStreamCostReadout": HiStreamCostReadout,
    "HiStreamPromptSchedule": HiStreamPromptSchedule,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "HiStreamLoader": "HiStream Loader",
    "HiStreamAnchorWindow": "Anchor Window Cache",
    "HiStreamDualResSampler": "Dual-Res Sampler (HiStream)",
    "HiStreamVAEChunkDecode": "VAE Chunk Decode (HiStream)",
    "HiStreamCostReadout": "HiStream Cost Readout",
    "HiStreamPromptSchedule": "HiStream Prompt Schedule",
}
