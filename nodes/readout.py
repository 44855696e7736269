"""HiStream Cost Readout: exact transformer FLOPs of a request and the compute floor they imply, without a model; on
request also its predicted peak GPU memory (the request run on PyTorch's meta device: shapes, no weights)."""

from __future__ import annotations

import math

import torch

from ..histream_core.config import MODEL_PRESETS
from ..histream_core.flops import H100_BF16_TFLOPS, flop_unit, run_flops
from ..histream_core.memory import GIB, predict_memory
from ..histream_core.modes import MODES
from ..histream_core.vae import WanVAEConfig
from .decode import check_tile_size
from .errors import input_error
from .sampler import build_config, request_geometry

NODE = "HiStream Cost Readout"
MODEL_SIZES = ("wan2.1-1.3b", "wan2.1-14b")


def memory_text(mode: str, width: int, height: int, length: int, model_cfg, window=None,
                dtype: torch.dtype = torch.bfloat16, decode_tile_size: int = 0, fp8_weights: bool = False,
                fp8_matmul: bool = False) -> str:
    """Predicted peaks of the sampler and of VAE Chunk Decode as ComfyUI runs them (one after the other, the
    HiStream model staying loaded during the decode); ``fp8_weights`` / ``fp8_matmul``: the model was loaded with
    fp8 block weights / fp8_e4m3fn_fast."""
    cfg = build_config(mode, window)
    request_geometry(NODE, width, height, length, cfg, model_cfg.patch_size[1])
    tile = decode_tile_size // 8 or None
    p = predict_memory(model_cfg, WanVAEConfig(), width, height, length, cfg, dtype,
                       tile=tile, orders=("after",), fp8_weights=fp8_weights, fp8_matmul=fp8_matmul)
    tiles = f" (tiles {decode_tile_size})" if tile else ""
    return (f"predicted peak GPU memory ({str(dtype).removeprefix('torch.')}, tensors only; add 1-2 GiB): sampler "
            f"{(p.denoise_peak + p.vae_weights) / GIB:.1f} GiB, VAE decode{tiles} "
            f"{(p.decode_peak + p.dit_weights) / GIB:.1f} GiB with the model loaded")


def cost_text(mode: str, width: int, height: int, length: int, model_name: str, model_cfg, window=None,
              tflops: float = H100_BF16_TFLOPS) -> str:
    if not 0 < tflops < math.inf:  # NaN too (the widget's minimum does not stop an API prompt)
        raise input_error(NODE, "tflops", f"{tflops!r} is not a matmul rate: give your GPU's TFLOP/s (H100 bf16: "
                          f"{H100_BF16_TFLOPS:g})")
    cfg = build_config(mode, window)
    request_geometry(NODE, width, height, length, cfg, model_cfg.patch_size[1])
    run = run_flops(model_cfg, cfg, width, height, length, mode)
    unit, scale, floor_unit = flop_unit(run.tflop_total)  # small runs in GFLOP or MFLOP, so nothing reads 0
    floor = 1000 * scale * run.tflop_per_frame / tflops
    return "\n".join([
        f"{mode} · {width}x{height} · {length} frames · {model_name}",
        f"model calls: {run.model_calls} in {len(run.per_chunk)} chunks",
        f"compute: {scale * run.tflop_total:,.0f} {unit} total, {scale * run.tflop_per_frame:,.1f} {unit}/frame",
        f"floor at {tflops:g} TFLOP/s: {floor:,.1f} {floor_unit}/frame, {run.tflop_total / tflops:,.3g} s for the "
        "video",
    ])


class HiStreamCostReadout:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (list(MODES), {"default": "histream", "tooltip": "The mode preset to count."}),
                "width": ("INT", {"default": 1920, "min": 16, "max": 4096, "step": 16, "tooltip": "Video width."}),
                "height": ("INT", {"default": 1088, "min": 16, "max": 4096, "step": 16, "tooltip": "Video height."}),
                "length": ("INT", {"default": 81, "min": 1, "max": 10001, "step": 4, "tooltip": "Frames, 4k+1."}),
                "model_size": (list(MODEL_SIZES), {"default": "wan2.1-1.3b", "tooltip": (
                    "Which Wan2.1 to count, unless a HiStream model is connected.")}),
                "tflops": ("FLOAT", {"default": H100_BF16_TFLOPS, "min": 1.0, "max": 100000.0, "step": 1.0,
                                     "tooltip": "Sustained matmul rate of your GPU (H100 bf16: 798)."}),
            },
            "optional": {
                "window": ("HISTREAM_WINDOW", {"tooltip": "Count with this window instead of the mode's."}),
                "histream_model": ("HISTREAM_MODEL", {"tooltip": "Count with this model's shape."}),
                "predict_memory": ("BOOLEAN", {"default": False, "tooltip": (
                    "Also predict the peak GPU memory of the sampler and of VAE Chunk Decode by running the request "
                    "on PyTorch's meta device (no weights, no GPU; about a minute on a CPU at 1080p).")}),
                "decode_tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip": (
                    "The tile_size of your VAE Chunk Decode, for the memory prediction (0 = whole frames).")}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = "HiStream"
    DESCRIPTION = ("Transformer FLOPs of a HiStream run (denoising and cache passes, 2 per multiply-add) and the "
                   "per-frame time floor at a given matmul rate; optionally the predicted peak GPU memory. Counts "
                   "only; runs no model.")

    def report(self, mode, width, height, length, model_size, tflops, window=None, histream_model=None,
               predict_memory=False, decode_tile_size=0):
        dtype, fp8 = torch.bfloat16, {}
        if histream_model is not None:
            model = histream_model.model
            fp8 = {"fp8_weights": model.stores_block_weights_in_fp8, "fp8_matmul": model.uses_fp8_matmul}
            name, model_cfg, dtype = histream_model.name, histream_model.model.cfg, histream_model.model.compute_dtype
        else:
            name, model_cfg = model_size, MODEL_PRESETS[model_size]
        text = cost_text(mode, width, height, length, name, model_cfg, window, tflops)
        if predict_memory:
            check_tile_size(NODE, "decode_tile_size", decode_tile_size)
            text += "\n" + memory_text(mode, width, height, length, model_cfg, window, dtype, decode_tile_size,
                                        **fp8)
        return {"ui": {"text": [text]}, "result": (text,)}
