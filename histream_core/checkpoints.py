"""Load Wan2.1 text-to-video DiT checkpoints in any common key layout, with no conversion step by the user.

Layouts, detected from the keys:
  * ``wan``: the original Wan2.1 names (``blocks.0.self_attn.q.weight``), which are ``CausalWanModel``'s own;
  * the same under a ``model.diffusion_model.`` / ``diffusion_model.`` / ``model.`` prefix (ComfyUI files,
    Self-Forcing generators); keys outside the detected prefix (a bundled VAE or text encoder) are ignored;
  * ``diffusers`` (``blocks.0.attn1.to_q.weight``, ``condition_embedder.*``, ``scale_shift_table``, ``proj_out``),
    renamed back to Wan names here (note diffusers' ``norm2`` is Wan's ``norm3``, the cross-attention norm);
  * Self-Forcing / CausVid / LongLive ``.pt`` dicts holding ``generator_ema`` (preferred) or ``generator``.
Training wrappers (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``) are stripped anywhere.

Files are read by ``weight_files.open_weight_file``: a ``.safetensors`` header alone gives the shapes, so
``inspect_checkpoint`` loads no weights; ``.pt``/``.pth``/``.ckpt``/``.bin`` files only through
``torch.load(weights_only=True)``, so no code in a file is ever run.

fp8 weights stay fp8 in memory and every layer upcasts its weight at compute time: plain e4m3fn weights as they
are, ComfyUI "scaled fp8" files (a ``scale_weight`` per tensor or per output row) with their scales (real weight =
weight * scale), unless ``weight_dtype`` asks for a wider dtype (then they are dequantized on load). Asking for fp8
stores the transformer blocks' linear weights (98% of the 1.3B model) as e4m3 with one scale per output channel;
the embeddings, the modulation path and the head keep their precision.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig
from .model.layers import FP8, quantize_weight
from .model.wan import CausalWanModel
from .vae.latent_format import LATENT_CHANNELS
from .weight_files import (DROPPED_SUFFIXES, FP8_DTYPES, TensorEntry, Unusable, WeightFile, check_fit, dequantize,
                           few, open_weight_file, require_keys, scaled_weight_key)

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "")  # transformer.: diffusers
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
GENERATOR_KEYS = ("generator_ema", "generator")
LAYOUTS_TRIED = (
    "wan (original Wan2.1 keys, blocks.0.self_attn.q.weight)",
    "wan under a 'model.diffusion_model.', 'diffusion_model.' or 'model.' prefix (ComfyUI)",
    "diffusers (blocks.0.attn1.to_q.weight), with or without those prefixes or a 'transformer.' one",
    "Self-Forcing .pt dict holding 'generator_ema' or 'generator'",
)
WHAT_TO_DO = ("pick a Wan2.1 text-to-video diffusion model (DiT) such as self_forcing_dmd.pt or "
              "wan2.1_t2v_1.3B_fp16.safetensors (ComfyUI: in models/diffusion_models; CLI: --checkpoint)")

# Keys whose presence identifies a layout (after the prefix); any one of them is enough.
_SIGNATURES = {
    "wan": ("head.head.weight", "time_embedding.0.weight", "blocks.0.self_attn.q.weight"),
    "diffusers": ("proj_out.weight", "condition_embedder.time_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight"),
}
# diffusers module path -> Wan module path, outside and inside the blocks (image-embedder names included so that
# image-to-video diffusers files reach the "not supported" check under their Wan names).
_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
_DIFFUSERS_BLOCK = {
    **{f"attn{i}.{d}": f"{w}.{o}" for i, w in ((1, "self_attn"), (2, "cross_attn"))
       for d, o in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                    ("norm_k", "norm_k"))},
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",  # diffusers: norm2 = cross-attention norm (affine), norm3 = FFN norm; Wan swaps them
    "norm3": "norm2",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


class CheckpointError(ValueError):
    """A file that cannot be loaded as a Wan2.1 T2V DiT; the message says why and what to do."""


@dataclass
class _WanCheckpoint:
    """A checkpoint renamed to Wan keys: the weights, their fp8 scales, and what was set aside."""

    layout: str  # "wan" | "diffusers"
    prefix: str
    entries: dict[str, TensorEntry]
    scales: dict[str, TensorEntry] = field(default_factory=dict)  # Wan weight key -> its scaled-fp8 scale
    ignored: list[str] = field(default_factory=list)  # keys outside the prefix (bundled VAE, text encoder)

    def describe(self, raw: WeightFile) -> str:
        parts = [self.layout + " keys"]
        if self.prefix:
            parts.append(f"under '{self.prefix}'")
        if raw.source:
            parts.append(f"from '{raw.source}'")
        return " ".join(parts)


# -- public API ---------------------------------------------------------------------------------------------------
def load_wan_model(
    path: str | Path,
    *,
    weight_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    head_dim: int = 128,
    text_len: int = 512,
) -> CausalWanModel:
    """Load a Wan2.1 T2V DiT from ``path`` in any supported layout, detecting its config from the tensor shapes.

    weight_dtype: None keeps each tensor's stored dtype (fp8 stays fp8, scaled fp8 with its scales); a float dtype
    casts to it; fp8 applies to the blocks' linear weights only (e4m3fn: scaled per output channel).
    config: use this config instead of the detected one (checked against the file's shapes).
    head_dim, text_len: what the shapes cannot tell (Wan: 128 and 512).
    Returns the model in eval mode with gradients off (call ``requires_grad_(True)`` to train it).
    Raises CheckpointError for anything that is not a loadable Wan2.1 T2V DiT.
    """
    if weight_dtype is not None and not weight_dtype.is_floating_point:
        raise ValueError(f"weight_dtype must be a floating dtype or None, got {weight_dtype}")
    path = Path(path)
    with _open_checkpoint(path) as raw:
        ckpt, model = _prepare(path, raw, config, head_dim, text_len, compute_dtype)
        state, scales = {}, {}
        for key, entry in ckpt.entries.items():
            state[key], scale = _materialize(entry, ckpt.scales.get(key), _scalable(model, key), weight_dtype,
                                             compute_dtype, device)
            if scale is not None:
                scales[key] = scale
    model.load_state_dict(state, strict=True, assign=True)
    for key, scale in scales.items():
        model.get_submodule(key.removesuffix(".weight")).weight_scale = scale
    model.requires_grad_(False).eval()
    log.info("loaded %s (%s): %s, weights %s%s", path.name, ckpt.describe(raw), model.cfg, _dtype_summary(state),
             f" ({len(scales)} of them with fp8 scales)" if scales else "")
    return model


def detect_config(state_dict: Mapping[str, Any], head_dim: int = 128, text_len: int = 512) -> ModelConfig:
    """The ModelConfig of a Wan2.1 T2V state dict in any supported key layout, read from tensor shapes.

    Values only need a ``.shape``. num_heads = dim // head_dim; qk_norm and cross_attn_norm follow key presence.
    """
    try:
        ckpt = _to_wan_layout({key: TensorEntry.of(value) for key, value in state_dict.items()})
        return _config_from_shapes(ckpt.entries, head_dim, text_len)
    except Unusable as problem:
        raise _error("<state dict>", problem, None) from None


def inspect_checkpoint(path: str | Path, *, head_dim: int = 128, text_len: int = 512) -> dict[str, Any]:
    """Layout, config, dtypes and parameter count of a checkpoint, checked as ``load_wan_model`` would.

    Reads only the header of a .safetensors file; a .pt file is memory-mapped where its format allows.
    Keys: path, container, source, layout, prefix, config, dtypes (dtype name -> parameter count),
    parameters, scaled_fp8, ignored_keys.
    """
    path = Path(path)
    with _open_checkpoint(path) as raw:
        ckpt, model = _prepare(path, raw, None, head_dim, text_len, torch.float32)
    dtypes = Counter()
    for entry in ckpt.entries.values():
        dtypes[_dtype_name(entry.dtype)] += math.prod(entry.shape)
    return {
        "path": str(path), "container": raw.container, "source": raw.source, "layout": ckpt.layout,
        "prefix": ckpt.prefix, "config": model.cfg, "dtypes": dict(dtypes), "parameters": sum(dtypes.values()),
        "scaled_fp8": bool(ckpt.scales), "ignored_keys": len(ckpt.ignored),
    }


def _prepare(path: Path, raw: WeightFile, config: ModelConfig | None, head_dim: int, text_len: int,
             compute_dtype: torch.dtype) -> tuple[_WanCheckpoint, CausalWanModel]:
    """Rename to Wan keys, detect the config (unless given), build the model on the meta device, check the fit."""
    ckpt = None
    try:
        ckpt = _to_wan_layout(raw.entries)
        cfg = config if config is not None else _config_from_shapes(ckpt.entries, head_dim, text_len)
        with torch.device("meta"):
            model = CausalWanModel(cfg, compute_dtype)
        _check_fits(ckpt, model)
    except Unusable as problem:
        raise _error(path, problem, ckpt.describe(raw) if ckpt else None) from None
    return ckpt, model


# -- reading files ------------------------------------------------------------------------------------------------
def _open_checkpoint(path: Path) -> AbstractContextManager[WeightFile]:
    """``path``'s tensors as lazy entries, those of a Self-Forcing dict's generator; CheckpointError if unreadable."""
    return open_weight_file(path, advice=WHAT_TO_DO, error=lambda problem: _error(path, problem, None),
                            nested=GENERATOR_KEYS)


# -- layouts ------------------------------------------------------------------------------------------------------
def _strip_wrappers(key: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _detect_layout(keys: set[str]) -> tuple[str, str]:
    if not keys:
        raise Unusable("the file holds no tensors", WHAT_TO_DO)
    for prefix in PREFIXES:
        for layout, signature in _SIGNATURES.items():
            if any(prefix + key in keys for key in signature):
                return layout, prefix
    raise Unusable(f"none of its keys belong to a Wan2.1 DiT; its keys include {few(sorted(keys))}",
                   _guess_what_it_is(keys))


def _guess_what_it_is(keys: set[str]) -> str:
    """A hint for files of the wrong kind, which users often pick in the wrong loader."""
    roots = {key.split(".", 1)[0] for key in keys}
    if {"encoder", "decoder"} <= roots or {"first_stage_model"} & roots:
        return f"this looks like a VAE: give it as the VAE (ComfyUI: Load VAE; CLI: --vae) and {WHAT_TO_DO}"
    if {"shared", "token_embedding", "text_model", "encoder"} & roots:
        return (f"this looks like a text encoder: give it as the text encoder (ComfyUI: CLIPLoader type wan; CLI: "
                f"--text-encoder) and {WHAT_TO_DO}")
    return WHAT_TO_DO


def _diffusers_to_wan_key(key: str) -> str:
    """One diffusers Wan key as its original Wan name; unknown modules keep their name (and show as unexpected)."""
    block = re.fullmatch(r"(blocks\.\d+\.)(.+)", key)
    head, rest, table = (block[1], block[2], _DIFFUSERS_BLOCK) if block else ("", key, _DIFFUSERS_TOP)
    if rest == "scale_shift_table":
        return head + ("modulation" if block else "head.modulation")
    module, _, param = rest.rpartition(".")
    return head + table.get(module, module) + "." + param if module else key


def _to_wan_layout(raw: Mapping[str, TensorEntry]) -> _WanCheckpoint:
    """Detect the layout and prefix, rename to Wan keys and set the scaled-fp8 scales and metadata aside."""
    stripped = {_strip_wrappers(k): v for k, v in raw.items()}
    layout, prefix = _detect_layout(set(stripped))
    rename = _diffusers_to_wan_key if layout == "diffusers" else (lambda key: key)
    ckpt = _WanCheckpoint(layout, prefix, {})
    for key, entry in stripped.items():
        if not key.startswith(prefix):
            ckpt.ignored.append(key)
            continue
        key = key[len(prefix):]
        if key == "scaled_fp8" or key.endswith(DROPPED_SUFFIXES):
            continue
        weight = scaled_weight_key(key)
        if weight:
            ckpt.scales[rename(weight)] = entry
        else:
            ckpt.entries[rename(key)] = entry
    if ckpt.ignored:
        log.info("ignoring %d keys outside '%s' (e.g. %s)", len(ckpt.ignored), prefix, few(ckpt.ignored))
    return ckpt


# -- config and validation ----------------------------------------------------------------------------------------
def _config_from_shapes(entries: Mapping[str, TensorEntry], head_dim: int, text_len: int) -> ModelConfig:
    """Read dim, layers, FFN, text/freq dims, in/out channels, patch and norms from Wan-named tensor shapes."""
    if any(key.startswith("img_emb.") or ".k_img." in key for key in entries):
        raise Unusable("it is an image-to-video Wan checkpoint (img_emb / k_img keys), which HiStream does not "
                       "support", WHAT_TO_DO)
    require_keys(entries, ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                           "head.head.weight", "blocks.0.ffn.0.weight"))
    dim, in_dim, *patch = entries["patch_embedding.weight"].shape
    if in_dim == 36:
        raise Unusable("it is an image-to-video Wan checkpoint (36 input channels), which HiStream does not "
                       "support", WHAT_TO_DO)
    out_dim = entries["head.head.weight"].shape[0] // math.prod(patch)
    if (in_dim, out_dim) != (LATENT_CHANNELS, LATENT_CHANNELS):
        raise Unusable(f"it reads {in_dim}- and writes {out_dim}-channel latents, and the Wan2.1 VAE's have "
                       f"{LATENT_CHANNELS} (Wan2.2 TI2V-5B's 48-channel latents are not supported)", WHAT_TO_DO)
    if head_dim < 1:
        raise Unusable(f"head_dim must be a positive number of channels, got {head_dim}",
                       "Wan2.1 models use 128")
    if dim % head_dim:
        raise Unusable(f"its width {dim} is not a multiple of head_dim {head_dim}",
                       "give the head size it was trained with: 'inspect --head-dim N' on the command line, "
                       "load_wan_model(path, head_dim=N) from Python (generate, bench and the loader node assume "
                       "Wan2.1's 128)")
    layers = {int(m[1]) for key in entries if (m := re.match(r"blocks\.(\d+)\.", key))}
    try:
        return ModelConfig(
            dim=dim, ffn_dim=entries["blocks.0.ffn.0.weight"].shape[0], num_heads=dim // head_dim,
            num_layers=max(layers) + 1, freq_dim=entries["time_embedding.0.weight"].shape[1],
            text_dim=entries["text_embedding.0.weight"].shape[1], text_len=text_len, in_dim=in_dim,
            out_dim=out_dim, patch_size=tuple(patch),
            qk_norm="blocks.0.self_attn.norm_q.weight" in entries,
            cross_attn_norm="blocks.0.norm3.weight" in entries)
    except ValueError as exc:
        raise Unusable(f"its shapes give an invalid config ({exc})",
                       f"pass head_dim or config to match the checkpoint; {WHAT_TO_DO}") from None


def _check_fits(ckpt: _WanCheckpoint, model: CausalWanModel) -> None:
    cfg = model.cfg
    check_fit(model.state_dict(), ckpt.entries, ckpt.scales,
              model=f"a model of width {cfg.dim}, {cfg.num_layers} layers, FFN {cfg.ffn_dim}, text dim {cfg.text_dim}",
              float_hint=f"use an fp16, bf16, fp32 or fp8 e4m3fn version of the model; {WHAT_TO_DO}")


# -- dtypes -------------------------------------------------------------------------------------------------------
def _scalable(model: CausalWanModel, key: str) -> str | None:
    """"block" for a transformer block's linear weight, "other" for another weight that can be held as scaled fp8
    (CastLinear, CastConv3d), None for the rest."""
    owner, _, name = key.rpartition(".")
    if name != "weight" or not hasattr(model.get_submodule(owner), "weight_scale"):
        return None
    return "block" if key.startswith("blocks.") else "other"


def _materialize(entry: TensorEntry, scale: TensorEntry | None, scalable: str | None,
                 weight_dtype: torch.dtype | None, compute_dtype: torch.dtype, device: str | torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read one tensor and bring it to ``device`` as asked -> (tensor, its fp8 scale # [] or [out, 1] fp32, or None).

    A scaled-fp8 weight stays fp8 with its scale where its layer can hold one and fp8 (or the stored dtype) is asked
    for, else it is dequantized. Asked for fp8, a block's wider linear weight is quantized (e4m3fn: with a scale
    per output channel) and every other tensor keeps its stored dtype."""
    tensor = entry.load()
    fp8_asked = weight_dtype in FP8_DTYPES
    if scale is not None:
        scale = scale.load().float()
        if scalable and (weight_dtype is None or fp8_asked):
            return tensor.to(device), (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)).to(device)
        return dequantize(tensor, scale, weight_dtype or compute_dtype).to(device), None
    if weight_dtype is None or (fp8_asked and (tensor.dtype in FP8_DTYPES or scalable != "block")):
        return tensor.to(device), None
    if weight_dtype == FP8:
        values, scale = quantize_weight(tensor)
        return values.to(device), scale.to(device)
    return tensor.to(device=device, dtype=weight_dtype), None


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_summary(state: Mapping[str, torch.Tensor]) -> str:
    counts = Counter(_dtype_name(t.dtype) for t in state.values())
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


# -- messages -----------------------------------------------------------------------------------------------------
def _error(path: str | Path, problem: Unusable, read_as: str | None) -> CheckpointError:
    return CheckpointError(problem.message(path, "a Wan2.1 text-to-video model", LAYOUTS_TRIED, WHAT_TO_DO, read_as))


__all__ = ["CheckpointError", "load_wan_model", "detect_config", "inspect_checkpoint"]
