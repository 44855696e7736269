"""Precomputed umT5 text states read from a file (`.safetensors` with one tensor, or the key ``context``; `.pt`
read with weights_only). The text encoder's cache files have this format too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..weight_files import SAFETENSORS_SUFFIXES, Unusable, few, is_host_out_of_memory, load_torch_object


def load_text_embeddings(path: str | Path) -> torch.Tensor:
    """Read umT5 states # [1, tokens, 4096] (a [tokens, 4096] tensor gets a batch axis)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"text embedding file {path} is a folder; give the .safetensors file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"text embedding file {path} does not exist")
    save_hint = "save them with safetensors.torch.save_file({'context': states}, path)"
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file
            tensors = load_file(str(path))
        else:
            loaded = load_torch_object(path)
            tensors = loaded if isinstance(loaded, dict) else {"context": loaded}
    except Unusable as problem:
        raise ValueError(f"cannot read text embeddings from {path}: {problem.problem}; {problem.hint}") from None
    except Exception as exc:  # noqa: BLE001 - any safetensors failure means the same thing to the user
        if is_host_out_of_memory(exc):
            raise
        raise ValueError(f"cannot read text embeddings from {path} ({type(exc).__name__}: {exc}); it is truncated "
                         f"or not a safetensors file: {save_hint}") from exc
    if "context" in tensors:
        states = tensors["context"]
    elif len(tensors) == 1:
        states = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({few(sorted(tensors))}), not one: text states are a "
                         "single tensor (name it 'context'); a model's weights go to --checkpoint, --vae or "
                         "--text-encoder")
    if not isinstance(states, torch.Tensor) or states.ndim not in (2, 3) or (states.ndim == 3 and states.shape[0] != 1):
        shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ValueError(f"text states in {path} must be a [tokens, dim] or [1, tokens, dim] tensor (one prompt), got "
                         f"{shape}; {save_hint}")
    if not states.dtype.is_floating_point or not torch.isfinite(states).all():
        raise ValueError(f"text states in {path} are not finite floats ({states.dtype}, NaN/inf or integers): every "
                         f"frame would come out black; encode the prompt again and {save_hint}")
    return states[None] if states.ndim == 2 else states
