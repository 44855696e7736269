"""Loading Wan2.1 VAE weights: original Wan / ComfyUI layout or diffusers' ``AutoencoderKLWan`` layout.

``Wan2.1_VAE.pth`` (Wan release) and ``wan_2.1_vae.safetensors`` (ComfyUI, ``models/vae``) share the names this
package's modules use. diffusers renames them (``encoder.conv_in``, ``decoder.up_blocks.1.resnets.0.norm1``, ...);
:func:`wan_state_dict_from_diffusers` maps them back. The config is read from tensor shapes (base width from
``encoder.conv1.weight``, latent channels from ``conv2.weight``). Pickled files are only read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers
(``weight_files.open_weight_file``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..weight_files import TensorEntry, Unusable, check_fit, few, open_weight_file
from .config import WanVAEConfig
from .model import WanVAE

log = logging.getLogger(__name__)

EXPECTED_FILE = ("expected the Wan2.1 VAE: wan_2.1_vae.safetensors in ComfyUI's models/vae folder "
                 "(or Wan2.1_VAE.pth from the Wan2.1 release, or a diffusers AutoencoderKLWan file)")
LAYOUTS = ("wan (original Wan / ComfyUI)", "diffusers (AutoencoderKLWan)")
_PREFIXES = ("", "vae.", "first_stage_model.")  # bundles sometimes nest the VAE under one of these


class VAECheckpointError(ValueError):
    """A file that cannot be loaded as a Wan2.1 VAE; the message names the file and what was expected."""


_RESNET_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
                 "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}


def _resnet_key(tail: str) -> str:
    for diffusers_name, wan_name in _RESNET_PARTS.items():
        if tail.startswith(diffusers_name):
            return wan_name + tail[len(diffusers_name):]
    return tail  # resample.* and time_conv.* keep their names


def _key_rules(num_res_blocks: int) -> list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]:
    # A decoder stage is num_res_blocks + 1 residual blocks then its upsampler, flattened in Wan's ``upsamples``.
    per_stage = num_res_blocks + 2
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"quant_conv\.(.+)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(.+)", lambda m: f"conv2.{m[1]}"),
        (r"(encoder|decoder)\.conv_in\.(.+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.(.+)", lambda m: f"{m[1]}.head.0.{m[2]}"),
        (r"(encoder|decoder)\.conv_out\.(.+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_key(m[3])}"),
        (r"encoder\.down_blocks\.(\d+)\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.{_resnet_key(m[2])}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.{_resnet_key(m[3])}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
         lambda m: f"decoder.upsamples.{int(m[1]) * per_stage + num_res_blocks + 1}.{m[2]}"),
    ]
    return [(re.compile(pattern), fn) for pattern, fn in rules]


def wan_state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor],
                                  num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename an ``AutoencoderKLWan`` state dict to Wan's names. Keys no rule knows are kept as they are, so they
    show up as unexpected when loaded."""
    rules = _key_rules(num_res_blocks)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = next((fn(m) for pattern, fn in rules if (m := pattern.fullmatch(key))), key)
        out[new_key] = value
    return out


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    def error(problem: Unusable) -> VAECheckpointError:
        return VAECheckpointError(f"{path}: {problem.problem}; {problem.hint}")

    with open_weight_file(path, advice=EXPECTED_FILE, error=error) as weights:
        return {key: entry.load() for key, entry in weights.entries.items()}


def _detect(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Find the layout and strip a bundle prefix: ('wan' | 'diffusers', state dict) or None."""
    for prefix in _PREFIXES:
        for layout, probe in (("wan", "encoder.conv1.weight"), ("diffusers", "encoder.conv_in.weight")):
            if prefix + probe in state_dict:
                if not prefix:
                    return layout, dict(state_dict)
                return layout, {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return None


def _hint(keys: list[str]) -> str:
    """What else the file looks like. The text encoder is tested first: Wan's own umT5 file also has blocks.N keys
    (blocks.N.attn.q), where the DiT's are blocks.N.self_attn / attn1."""
    if any("text_model" in k or "token_embedding" in k or ".attn.q." in k or k.startswith(("encoder.block.", "shared."))
           for k in keys):
        return " It looks like a text encoder checkpoint (ComfyUI: CLIPLoader type wan; CLI: --text-encoder)."
    if any("patch_embedding" in k or "self_attn" in k or ".attn1." in k or k.startswith("model.diffusion_model.")
           for k in keys):
        return (" It looks like a Wan diffusion model (DiT) checkpoint: give it as the model (ComfyUI: HiStream "
                "Loader, models/diffusion_models; CLI: --checkpoint).")
    return ""


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load a Wan2.1 VAE from ``path`` (.safetensors, or .pt/.pth read with ``weights_only=True``), in either the
    Wan/ComfyUI or the diffusers layout, onto ``device`` in ``dtype``, in eval mode.

    Raises :class:`VAECheckpointError` naming the file, the layouts tried and a few missing/unexpected keys if the
    file is missing, unreadable or not a Wan2.1 VAE.
    """
    path = Path(path)
    return vae_from_state_dict(_read_tensors(path), source=str(path), device=device, dtype=dtype)


def vae_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Build a Wan2.1 VAE from tensors already in memory (e.g. ComfyUI's ``vae.first_stage_model.state_dict()``).

    Same layout detection and errors as :func:`load_vae`; ``source`` names the origin in error messages.
    """
    raw = dict(state_dict)
    found = _detect(raw)
    if found is None:
        keys = list(raw)
        raise VAECheckpointError(
            f"{source}: not a Wan2.1 VAE: none of the layouts tried matched ({'; '.join(LAYOUTS)}); missing e.g. "
            f"'encoder.conv1.weight' / 'encoder.conv_in.weight'; the file has {len(keys)} tensors such as "
            f"{few(sorted(keys))}.{_hint(keys)} {EXPECTED_FILE}")
    layout, state_dict = found
    conv_in = state_dict["encoder.conv1.weight" if layout == "wan" else "encoder.conv_in.weight"]
    z_key = "conv2.weight" if layout == "wan" else "post_quant_conv.weight"
    if conv_in.ndim != 5 or conv_in.shape[1] != 3:
        raise VAECheckpointError(
            f"{source}: {layout} layout, but not a Wan2.1 VAE (its encoder's input conv has weights of shape "
            f"{tuple(conv_in.shape)}, where Wan2.1's is a 3D conv over RGB frames, [C, 3, 3, 3, 3]; Wan2.2's "
            f"48-channel VAE is not supported). {EXPECTED_FILE}")
    if z_key not in state_dict:
        raise VAECheckpointError(
            f"{source}: {layout} layout, but '{z_key}', which gives the latent channels, is missing: the file is "
            f"incomplete (download it again). {EXPECTED_FILE}")
    config = WanVAEConfig(base_dim=conv_in.shape[0], z_dim=state_dict[z_key].shape[0])
    if layout == "diffusers":
        state_dict = wan_state_dict_from_diffusers(state_dict, config.num_res_blocks)

    with torch.device("meta"):
        model = WanVAE(config)
    try:
        check_fit(model.state_dict(), {key: TensorEntry.of(value) for key, value in state_dict.items()}, {},
                  model="a Wan2.1 VAE", float_hint=EXPECTED_FILE)
    except Unusable as problem:
        raise VAECheckpointError(
            f"{source}: read as the {layout} layout with base_dim={config.base_dim}, z_dim={config.z_dim}, but "
            f"{problem.problem}. Layouts known: {'; '.join(LAYOUTS)}. {EXPECTED_FILE}") from None
    model.load_state_dict(state_dict, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("loaded Wan2.1 VAE from %s (%s layout, base_dim %d, z_dim %d, %s on %s)",
             source, layout, config.base_dim, config.z_dim, dtype, device)
    return model


__all__ = ["VAECheckpointError", "load_vae", "vae_from_state_dict", "wan_state_dict_from_diffusers", "EXPECTED_FILE",
           "LAYOUTS"]
