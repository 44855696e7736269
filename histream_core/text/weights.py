"""Load umT5-XXL encoder weights from the files users have, in any of their key layouts.

Layouts, detected from the keys (``N`` = block index; the model's own names are Wan's):
  * ``hf``: transformers ``UMT5EncoderModel`` state dicts and ComfyUI's ``umt5_xxl_fp16.safetensors`` /
    ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``
        shared.weight | encoder.embed_tokens.weight                 -> token_embedding.weight   [vocab, dim]
        encoder.block.N.layer.0.layer_norm.weight                   -> blocks.N.norm1.weight
        encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight      -> blocks.N.attn.{q,k,v,o}.weight
        encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
                                                                    -> blocks.N.pos_embedding.embedding.weight
                                                                                                [buckets, heads]
        encoder.block.N.layer.1.layer_norm.weight                   -> blocks.N.norm2.weight
        encoder.block.N.layer.1.DenseReluDense.wi_0.weight          -> blocks.N.ffn.gate.0.weight  (GELU branch)
        encoder.block.N.layer.1.DenseReluDense.wi_1.weight          -> blocks.N.ffn.fc1.weight     (linear branch)
        encoder.block.N.layer.1.DenseReluDense.wo.weight            -> blocks.N.ffn.fc2.weight
        encoder.final_layer_norm.weight                             -> norm.weight
  * ``wan``: Wan2.1's ``models_t5_umt5-xxl-enc-bf16.pth`` (``token_embedding.weight``, ``blocks.N.attn.q.weight``, ...).
Either may sit under a prefix (a bundle's ``text_encoders.umt5xxl.transformer.``, the ``encoder.`` of Wan's full
encoder-decoder file); keys outside it, and the decoder and LM head of a full transformers checkpoint, are ignored.
ComfyUI scaled fp8: fp8 weights with a per-tensor ``<module>.scale_weight`` (real weight = weight * scale), a
``scaled_fp8`` marker tensor, maybe ``scale_input``; they are dequantized on load. ComfyUI files may also embed the
sentencepiece tokenizer as a uint8 ``spiece_model``.

Files are read by ``weight_files.open_weight_file``: ``.safetensors`` files tensor by tensor (peak memory: the model in
the target dtype); ``.pt``/``.pth``/``.ckpt``/``.bin`` only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..weight_files import (DROPPED_SUFFIXES, FP8_DTYPES, SAFETENSORS_SUFFIXES, TensorEntry, Unusable, WeightFile,
                            check_fit, dequantize, few, open_weight_file, require_keys,
                            scaled_weight_key)
from .errors import EXPECTED_ENCODER, TextEncoderError
from .umt5 import UMT5Config, UMT5Encoder

log = logging.getLogger(__name__)

LAYOUTS_TRIED = (
    "hf (transformers UMT5EncoderModel / ComfyUI umt5_xxl: encoder.block.0.layer.0.SelfAttention.q.weight)",
    "wan (Wan2.1 models_t5_umt5-xxl-enc-bf16.pth: blocks.0.attn.q.weight)",
    "either under a prefix, and either as ComfyUI scaled fp8 (per-tensor scale_weight)",
)
_SIGNATURES = {"hf": "encoder.block.0.layer.0.SelfAttention.q.weight", "wan": "blocks.0.attn.q.weight"}
_HF_TOP = {"shared": "token_embedding", "encoder.embed_tokens": "token_embedding", "encoder.final_layer_norm": "norm"}
_HF_BLOCK = {
    "layer.0.layer_norm": "norm1",
    **{f"layer.0.SelfAttention.{p}": f"attn.{p}" for p in "qkvo"},
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}
_HF_OTHER_PARTS = ("decoder.", "lm_head.")  # of a full encoder-decoder transformers checkpoint: not needed
_MARKERS = ("scaled_fp8", "spiece_model")  # not weights: the fp8 marker and the embedded tokenizer
_USE_ENCODER = f"use {EXPECTED_ENCODER}"


@dataclass
class _Renamed:
    layout: str
    prefix: str
    entries: dict[str, TensorEntry] = field(default_factory=dict)  # Wan name -> tensor
    scales: dict[str, TensorEntry] = field(default_factory=dict)  # Wan weight name -> its scaled-fp8 scale


# -- public API ---------------------------------------------------------------------------------------------------
def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs (as Wan runs the encoder), fp32 elsewhere (CPU bf16 matmuls are slow on many CPUs)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_umt5_encoder(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      max_distance: int = 128, text_len: int = 512) -> UMT5Encoder:
    """Load a umT5 encoder from ``path`` in any supported layout, its shape read from the tensors.

    dtype: every weight is cast to it (fp8 files dequantized); None = ``default_dtype(device)``.
    max_distance, text_len: what the file cannot tell (umT5: 128; Wan: 512).
    Returns the model in eval mode with gradients off. Raises TextEncoderError for any file it cannot use.
    """
    dtype = dtype or default_dtype(device)
    if not dtype.is_floating_point or dtype in FP8_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16 (fp8 files are dequantized on load), got {dtype}")
    path = Path(path)
    with _open(path) as file:
        try:
            renamed = _rename(file.entries)
            cfg = _config_from_shapes(renamed.entries, max_distance, text_len)
            with torch.device("meta"):
                model = UMT5Encoder(cfg)
            _check_fits(renamed, model)
        except Unusable as problem:
            raise _error(path, problem) from None
        state = {key: _materialize(entry, renamed.scales.get(key), dtype).to(device)
                 for key, entry in renamed.entries.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    fp8 = " (scaled fp8, dequantized)" if renamed.scales else ""
    log.info("loaded text encoder %s (%s keys%s%s): %s, %s on %s", path.name, renamed.layout,
             f" under '{renamed.prefix}'" if renamed.prefix else "", fp8, cfg, dtype, device)
    return model


def read_embedded_tokenizer(path: str | Path) -> bytes | None:
    """The sentencepiece model ComfyUI stores in some text-encoder files (uint8 ``spiece_model``), or None.
    Raises TextEncoderError for a file that is no umT5 encoder at all.

    Only ``.safetensors`` files are looked into (reading one tensor); torch files are never unpickled for this.
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return None
    with _open(path) as file:
        key = next((k for k in file.entries if k == "spiece_model" or k.endswith(".spiece_model")), None)
        if key is None:  # a file of another kind (a DiT, a VAE) is named as such, not as lacking a tokenizer
            try:
                _detect(set(file.entries))
            except Unusable as problem:
                raise _error(path, problem) from None
            return None
        return file.entries[key].load().numpy().tobytes()


# -- reading files ------------------------------------------------------------------------------------------------
def _open(path: Path) -> AbstractContextManager[WeightFile]:
    """``path``'s tensors as lazy entries; TextEncoderError if it cannot be read."""
    return open_weight_file(path, advice=_USE_ENCODER, error=lambda problem: _error(path, problem))


# -- layouts ------------------------------------------------------------------------------------------------------
def _detect(keys: set[str]) -> tuple[str, str]:
    """(layout, prefix) of the shortest prefix under which a layout's signature key appears."""
    found = [(len(key) - len(sig), layout, key[:len(key) - len(sig)])
             for layout, sig in _SIGNATURES.items() for key in keys
             if key.endswith(sig) and (key == sig or key[-len(sig) - 1] == ".")]
    if not found:
        raise Unusable(f"none of its keys belong to a umT5 encoder; its keys include {few(sorted(keys))}",
                       _guess_what_it_is(keys))
    _, layout, prefix = min(found)
    return layout, prefix


def _guess_what_it_is(keys: set[str]) -> str:
    """A hint for files of the wrong kind, which users often pick in the wrong slot."""
    def has(part: str) -> bool:
        return any(part in key for key in keys)

    if has("self_attn.q.weight") and has("patch_embedding"):
        what = "a Wan diffusion model (DiT): pass it as the checkpoint, not as the text encoder"
    elif has("decoder.") and has("conv"):
        what = "a VAE"
    elif has("text_model.") or has("transformer.resblocks"):
        what = "a CLIP text encoder"
    elif has("model.layers.0."):
        what = "a decoder-only language model"
    else:
        return _USE_ENCODER
    return f"this looks like {what}; the text encoder must be {EXPECTED_ENCODER}"


def _hf_to_wan(key: str) -> str:
    block = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.(\w+)", key)
    if block:
        return f"blocks.{block[1]}.{_HF_BLOCK.get(block[2], block[2])}.{block[3]}"
    module, _, param = key.rpartition(".")
    return f"{_HF_TOP.get(module, module)}.{param}" if module else key


def _rename(raw: Mapping[str, TensorEntry]) -> _Renamed:
    """Detect the layout and prefix, rename to Wan keys, set scales aside and drop markers and input scales."""
    layout, prefix = _detect(set(raw))
    rename = _hf_to_wan if layout == "hf" else (lambda key: key)
    out, ignored = _Renamed(layout, prefix), []
    for key, entry in raw.items():
        if key in _MARKERS or key.endswith(tuple("." + m for m in _MARKERS)) or key.endswith(DROPPED_SUFFIXES):
            continue
        if not key.startswith(prefix) or (layout == "hf" and key[len(prefix):].startswith(_HF_OTHER_PARTS)):
            ignored.append(key)
            continue
        key = key[len(prefix):]
        weight = scaled_weight_key(key)
        if weight:
            out.scales[rename(weight)] = entry
            continue
        name = rename(key)
        if name in out.entries:  # tied copies: shared.weight and encoder.embed_tokens.weight
            if out.entries[name].shape != entry.shape:
                raise Unusable(f"two tensors map to {name} with different shapes {out.entries[name].shape} and "
                               f"{entry.shape} (untied input embeddings?)")
            continue
        out.entries[name] = entry
    if ignored:
        log.info("ignoring %d keys that are not the encoder's (e.g. %s)", len(ignored), few(ignored))
    return out


# -- config and validation ----------------------------------------------------------------------------------------
def _config_from_shapes(entries: Mapping[str, TensorEntry], max_distance: int, text_len: int) -> UMT5Config:
    require_keys(entries, ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
                           "blocks.0.pos_embedding.embedding.weight"))
    layers = {int(m[1]) for key in entries if (m := re.match(r"blocks\.(\d+)\.", key))}
    if len(layers) > 1 and "blocks.1.pos_embedding.embedding.weight" not in entries:
        raise Unusable("only its first layer has a relative position bias: it is a T5 v1.1 encoder (t5xxl, as "
                       "Flux and SD3 use), not umT5, whose every layer has its own")
    vocab, dim = entries["token_embedding.weight"].shape
    buckets, heads = entries["blocks.0.pos_embedding.embedding.weight"].shape
    try:
        return UMT5Config(vocab_size=vocab, dim=dim, ffn_dim=entries["blocks.0.ffn.fc1.weight"].shape[0],
                          num_heads=heads, head_dim=entries["blocks.0.attn.q.weight"].shape[0] // heads,
                          num_layers=max(layers) + 1, num_buckets=buckets, max_distance=max_distance,
                          text_len=text_len)
    except ValueError as exc:
        raise Unusable(f"its shapes give an invalid config ({exc})") from None


def _check_fits(renamed: _Renamed, model: UMT5Encoder) -> None:
    cfg = model.cfg
    check_fit(model.state_dict(), renamed.entries, renamed.scales,
              model=f"a umT5 encoder of width {cfg.dim}, {cfg.num_layers} layers, FFN {cfg.ffn_dim}, "
                    f"{cfg.num_heads} heads",
              float_hint=f"use an fp32, bf16, fp16 or (scaled) fp8 file of {EXPECTED_ENCODER}")


def _materialize(entry: TensorEntry, scale: TensorEntry | None, dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor into ``dtype``, dequantized if it carries a scaled-fp8 scale."""
    tensor = entry.load()
    return tensor.to(dtype) if scale is None else dequantize(tensor, scale.load(), dtype)


# -- messages -----------------------------------------------------------------------------------------------------
def _error(path: Path, problem: Unusable) -> TextEncoderError:
    return TextEncoderError(problem.message(path, "a umT5-XXL text encoder", LAYOUTS_TRIED, _USE_ENCODER))


__all__ = ["default_dtype", "load_umt5_encoder", "read_embedded_tokenizer"]
