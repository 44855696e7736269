"""HiStream Loader: a causal Wan2.1 T2V DiT from models/diffusion_models, in any layout the core detects."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..histream_core.checkpoints import CheckpointError, load_wan_model
from ..histream_core.model.attention import BACKENDS, AttentionBackendError, check_backend_runs
from ..histream_core.model.layers import check_fp8_matmul
from ..histream_core.model.wan import CausalWanModel
from . import host
from .errors import input_error

log = logging.getLogger(__name__)

NODE = "HiStream Loader"
CATEGORY = "HiStream"
WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
                 "fp8_e4m3fn_fast": None}  # fast: quantized from the file's weights by use_fp8_matmul
FP8_MATMUL = "fp8_e4m3fn_fast"  # ComfyUI's name (UNETLoader) for fp8 weights that also multiply in fp8
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICES = ("main device", "cpu")


@dataclass(frozen=True)
class HiStreamModel:
    """The HISTREAM_MODEL value: the loaded DiT and the settings the sampler needs from the loader."""

    model: CausalWanModel
    name: str
    attention_backend: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class HiStreamLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (host.model_files("diffusion_models"), {"tooltip": (
                "A causal (Self-Forcing-style) Wan2.1 text-to-video DiT from models/diffusion_models, e.g. "
                "self_forcing_dmd.pt. Original Wan, ComfyUI, diffusers and Self-Forcing .pt layouts all load.")}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": (
                "Storage precision of the weights. default keeps the file's (fp8 files stay fp8, scaled fp8 with its "
                "scales); fp8_e4m3fn halves memory (the blocks' weights in fp8 with a scale per output channel, "
                "upcast at compute time); fp8_e4m3fn_fast also multiplies in fp8 in the transformer blocks (needs "
                "compute_dtype bf16 and an Ada/Hopper or newer GPU; faster, slightly different videos).")}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "bf16", "tooltip": (
                "Precision of the matmuls and attention. bf16 on modern GPUs; fp32 for exact CPU runs.")}),
            "attention": (list(BACKENDS), {"default": "sdpa", "tooltip": (
                "Attention kernel. sdpa is built into torch; flash_attn and sage need their packages installed.")}),
            "device": (list(DEVICES), {"default": "main device", "tooltip": (
                "main device: the GPU ComfyUI runs on. cpu: slow, for trying things out without a GPU.")}),
            "compile": ("BOOLEAN", {"default": False, "tooltip": (
                "torch.compile the transformer blocks (CUDA). The first video compiles for a minute or two; later "
                "ones run ~1.4x faster (1080p HiStream+ on an H100: 0.145 -> 0.108 s/frame).")}),
        }}

    RETURN_TYPES = ("HISTREAM_MODEL",)
    RETURN_NAMES = ("histream_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a causal Wan2.1 DiT once for the HiStream sampler (ComfyUI caches it between runs)."

    def load(self, ckpt_name, weight_dtype, compute_dtype, attention, device, compile=False):
        target = host.main_device() if device == "main device" else torch.device("cpu")
        dtype = COMPUTE_DTYPES[compute_dtype]
        _check_attention(attention, target, dtype)
        if weight_dtype == FP8_MATMUL:
            _check_fp8_matmul(target, compute_dtype)
        path = host.model_path("diffusion_models", ckpt_name)
        try:
            model = load_wan_model(path, weight_dtype=WEIGHT_DTYPES[weight_dtype], compute_dtype=dtype,
                                   device=target)
        except CheckpointError as exc:
            raise input_error(NODE, "ckpt_name", str(exc)) from exc
        if weight_dtype == FP8_MATMUL:
            model.use_fp8_matmul()
        if compile and target.type == "cuda":
            model.compile_blocks()
        elif compile:
            log.warning("%s: compile is for CUDA GPUs; running %s eagerly", NODE, target)
        cfg = model.cfg
        log.info("HiStream: %s on %s (dim %d, %d layers, weights %s, compute %s, attention %s)", ckpt_name, target,
                 cfg.dim, cfg.num_layers, weight_dtype, compute_dtype, attention)
        return (HiStreamModel(model, ckpt_name, attention),)


def _check_fp8_matmul(device: torch.device, compute_dtype: str) -> None:
    """fp8_e4m3fn_fast's needs, checked before the checkpoint is read (minutes for a 14B one)."""
    if compute_dtype != "bf16":
        raise input_error(NODE, "weight_dtype", f"{FP8_MATMUL} multiplies bf16 activations in fp8, and compute_dtype "
                          f"is {compute_dtype}: set compute_dtype to bf16, or weight_dtype to fp8_e4m3fn (fp8 storage "
                          "alone)")
    try:
        check_fp8_matmul(device)
    except ValueError as exc:
        raise input_error(NODE, "weight_dtype", f"{FP8_MATMUL}: {exc}") from exc


def _check_attention(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    try:
        check_backend_runs(backend, device, dtype)
    except AttentionBackendError as exc:
        raise input_error(NODE, "attention", str(exc)) from exc
