"""Checkpoint loading: every key layout round-trips a tiny random model, dtypes are kept or cast as asked, and every
kind of bad file is refused with a CheckpointError that names the file, the layouts tried and the offending keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import needs_fp8_matmul, tiny_model
from histream_core.checkpoints import CheckpointError, detect_config, inspect_checkpoint, load_wan_model
from histream_core.config import MODEL_PRESETS
from histream_core.model import CausalWanModel

diffusers_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

FP8 = torch.float8_e4m3fn
TINY = dict(head_dim=24, text_len=16)  # what the shapes cannot tell, for the tiny preset


@pytest.fixture(scope="module")
def model() -> CausalWanModel:
    return tiny_model(seed=7)


@pytest.fixture(scope="module")
def inputs(model):
    gen = torch.Generator().manual_seed(0)
    cfg = model.cfg
    return (torch.randn(1, cfg.in_dim, 2, 4, 6, generator=gen), torch.tensor([700.0]),
            torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen))


@pytest.fixture(scope="module")
def reference(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def wan_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def write(obj, path: Path) -> Path:
    """.safetensors for a flat dict of tensors, torch.save otherwise (Self-Forcing files are torch.save'd dicts)."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def prefixed(state, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def diffusers_state(state) -> dict[str, torch.Tensor]:
    return diffusers_utils.convert_wan_transformer_to_diffusers(dict(state))  # consumes its input: pass a copy


LAYOUTS = {
    "wan": lambda s: s,
    "model.": lambda s: prefixed(s, "model."),
    "model.diffusion_model.": lambda s: prefixed(s, "model.diffusion_model."),
    "diffusers": diffusers_state,
    "diffusers under model.diffusion_model.": lambda s: prefixed(diffusers_state(s), "model.diffusion_model."),
    "diffusers under transformer.": lambda s: prefixed(diffusers_state(s), "transformer."),
    "fsdp + compile wrappers": lambda s: {k.replace("blocks.", "_orig_mod.blocks._fsdp_wrapped_module.")
                                          .replace("self_attn.", "_checkpoint_wrapped_module.self_attn."): v
                                          for k, v in prefixed(s, "model.").items()},
    "self-forcing generator_ema": lambda s: {"generator_ema": prefixed(s, "model."), "step": 600},
    "self-forcing generator": lambda s: {"generator": prefixed(s, "model.")},
}


@pytest.mark.parametrize("layout,suffix", [(layout, suffix) for layout in LAYOUTS for suffix in (".safetensors", ".pt")
                                           if not (layout.startswith("self-forcing") and suffix == ".safetensors")])
def test_every_layout_round_trips(layout, suffix, model, inputs, reference, tmp_path):
    path = write(LAYOUTS[layout](wan_state(model)), tmp_path / f"ckpt{suffix}")
    loaded = load_wan_model(path, **TINY)
    assert loaded.cfg == model.cfg
    assert not any(t.is_meta for t in loaded.state_dict().values())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(forward(loaded, inputs), reference)


def test_generator_ema_is_preferred(model, tmp_path):
    other = tiny_model(seed=8)
    path = write({"generator": prefixed(wan_state(other), "model."),
                  "generator_ema": prefixed(wan_state(model), "model.")}, tmp_path / "sf.pt")
    loaded = load_wan_model(path, **TINY)
    assert torch.equal(loaded.head.head.weight, model.head.head.weight)
    assert inspect_checkpoint(path, **TINY)["source"] == "generator_ema"


def test_a_bundle_loads_its_dit_and_ignores_the_rest(model, inputs, reference, tmp_path, caplog):
    """All-in-one files hold the DiT under model.diffusion_model. beside a VAE and a text encoder."""
    state = prefixed(wan_state(model), "model.diffusion_model.")
    state.update({"first_stage_model.decoder.conv1.weight": torch.zeros(4, 4, 1, 1, 1),
                  "text_encoders.umt5xxl.shared.weight": torch.zeros(8, 4)})
    with caplog.at_level(logging.INFO, logger="histream_core.checkpoints"):
        loaded = load_wan_model(write(state, tmp_path / "aio.safetensors"), **TINY)
    assert torch.equal(forward(loaded, inputs), reference)
    assert "ignoring 2 keys outside 'model.diffusion_model.'" in caplog.text


def test_diffusers_reverse_map_is_the_inverse_of_diffusers_converter():
    """Full-size key sets on the meta device: diffusers' converter then ours gives back every Wan key and shape."""
    with torch.device("meta"):
        big = CausalWanModel(MODEL_PRESETS["wan2.1-1.3b"])
    state = big.state_dict()
    assert detect_config(diffusers_state(state)) == MODEL_PRESETS["wan2.1-1.3b"]
    assert detect_config(prefixed(state, "model.diffusion_model.")) == MODEL_PRESETS["wan2.1-1.3b"]


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.1-14b"])
def test_detect_config_of_the_real_sizes(preset):
    with torch.device("meta"):
        state = CausalWanModel(MODEL_PRESETS[preset]).state_dict()
    assert detect_config(state) == MODEL_PRESETS[preset]


def test_detect_config_reads_norm_switches():
    cfg = MODEL_PRESETS["tiny"].with_(qk_norm=False, cross_attn_norm=False, num_layers=3, ffn_dim=72)
    with torch.device("meta"):
        state = CausalWanModel(cfg).state_dict()
    assert detect_config(state, **TINY) == cfg


def test_inspect_reads_the_header_only(model, tmp_path):
    state = {k: (v.to(FP8) if k.endswith(".weight") and v.ndim >= 2 else v) for k, v in wan_state(model).items()}
    path = write(prefixed(state, "model.diffusion_model."), tmp_path / "m.safetensors")
    info = inspect_checkpoint(path, **TINY)
    assert info["layout"] == "wan" and info["prefix"] == "model.diffusion_model." and info["container"] == "safetensors"
    assert info["config"] == model.cfg
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(info["dtypes"]) == {"float8_e4m3fn", "float32"}


# -- dtypes -------------------------------------------------------------------------------------------------------
def fp8_linear_weights(state) -> dict[str, torch.Tensor]:
    return {k: (v.to(FP8) if k.endswith(".weight") and v.ndim >= 2 else v) for k, v in state.items()}


def test_fp8_weights_stay_fp8_and_upcast_per_layer(model, inputs, reference, tmp_path):
    fp8_state = fp8_linear_weights(wan_state(model))
    loaded = load_wan_model(write(fp8_state, tmp_path / "fp8.safetensors"), **TINY)
    assert loaded.blocks[0].self_attn.q.weight.dtype == FP8
    assert loaded.patch_embedding.weight.dtype == FP8
    assert loaded.blocks[0].self_attn.q.bias.dtype == torch.float32
    widened = load_wan_model(write(fp8_state, tmp_path / "fp8.safetensors"), weight_dtype=torch.bfloat16, **TINY)
    assert widened.blocks[0].self_attn.q.weight.dtype == torch.bfloat16  # asked wider: upcast on load
    out = forward(loaded, inputs)
    # Upcasting per layer computes exactly what an fp32 model holding the fp8-rounded weights computes ...
    rounded = tiny_model(seed=7)
    rounded.load_state_dict({k: v.float() for k, v in fp8_state.items()})
    torch.testing.assert_close(out, forward(rounded, inputs), rtol=1e-5, atol=1e-5)
    # ... and e4m3's 3-bit mantissa costs: weights 2.7e-2 RMS relative rounding, output 4.9e-2 here (tiny model).
    assert 1e-2 < relative_error(out, reference) < 0.1


def test_fp32_file_cast_to_fp8_on_load(model, inputs, reference, tmp_path):
    path = write(wan_state(model), tmp_path / "fp32.pt")
    loaded = load_wan_model(path, weight_dtype=FP8, **TINY)
    ffn = loaded.blocks[1].ffn[0]
    assert ffn.weight.dtype == FP8 and ffn.weight_scale.shape == (ffn.weight.shape[0], 1)  # a scale per channel
    # the blocks' linear weights only: embeddings, the modulation path, the head, norms keep their precision
    assert loaded.blocks[1].modulation.dtype == torch.float32 and loaded.time_projection[1].weight.dtype != FP8
    assert loaded.patch_embedding.weight.dtype == torch.float32 and loaded.head.head.weight.dtype == torch.float32
    assert loaded.blocks[1].norm3.weight.dtype == torch.float32
    # each row's largest weight maps to e4m3's largest value, and the scales undo it
    assert torch.all(ffn.weight.float().abs().amax(1) == 448)
    torch.testing.assert_close(ffn.weight.float() * ffn.weight_scale, model.blocks[1].ffn[0].weight, rtol=0.07,
                               atol=0)
    assert relative_error(forward(loaded, inputs), reference) < 0.1  # measured 4.7e-2


def test_scaled_fp8_keeps_the_bits_a_raw_cast_loses():
    """At the magnitude of Wan's weights (1/sqrt(fan-in), 1536 to 8960 inputs) many fall into e4m3's subnormal
    range below 2^-6, where a raw cast keeps few bits; a scale per output channel moves them into range."""
    from histream_core.model.layers import quantize_weight
    for fan_in, gain in ((1536, 1.4), (8960, 3.0)):  # measured 2.5e-2 vs 3.8e-2, and 2.6e-2 vs 9.1e-2
        weight = (torch.rand(256, fan_in, generator=torch.Generator().manual_seed(0)) * 2 - 1) / fan_in ** 0.5
        values, scale = quantize_weight(weight)
        scaled_error = relative_error(values.float() * scale, weight)
        assert scaled_error < 0.03 and relative_error(weight.to(FP8).float(), weight) > gain * scaled_error


def scaled_fp8(state) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 format: fp8 weight = weight / scale, a per-tensor ``scale_weight``, a marker key."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim >= 2:
            scale = value.abs().max() / 448.0
            out[key], out[key.removesuffix("weight") + "scale_weight"] = (value / scale).to(FP8), scale.reshape(())
        else:
            out[key] = value
    return out


def test_comfy_scaled_fp8_stays_fp8_with_its_scales(model, inputs, reference, tmp_path):
    path = write(prefixed(scaled_fp8(wan_state(model)), "model.diffusion_model."), tmp_path / "scaled.safetensors")
    kept = load_wan_model(path, **TINY)
    q = kept.blocks[0].self_attn.q
    assert q.weight.dtype == FP8 and q.weight_scale.shape == () and kept.patch_embedding.weight.dtype == FP8
    assert relative_error(forward(kept, inputs), reference) < 0.1  # measured 4.6e-2
    # computing with the scales per call is dequantizing on load, bit for bit
    dequantized = load_wan_model(path, weight_dtype=torch.float32, **TINY)
    assert dequantized.blocks[0].self_attn.q.weight.dtype == torch.float32
    assert dequantized.blocks[0].self_attn.q.weight_scale is None
    assert torch.equal(forward(kept, inputs), forward(dequantized, inputs))
    assert load_wan_model(path, weight_dtype=torch.bfloat16, **TINY).head.head.weight.dtype == torch.bfloat16
    asked_fp8 = load_wan_model(path, weight_dtype=FP8, **TINY)
    assert torch.equal(asked_fp8.blocks[0].self_attn.q.weight_scale, q.weight_scale)


@needs_fp8_matmul
def test_the_fp8_matmul_takes_scaled_fp8_weights_as_stored(model, tmp_path):
    path = write(prefixed(scaled_fp8(wan_state(model)), "model.diffusion_model."), tmp_path / "scaled.safetensors")
    kept = load_wan_model(path, **TINY)
    q = kept.blocks[0].self_attn.q
    kept.compute_dtype = torch.bfloat16
    fast = kept.use_fp8_matmul().blocks[0].self_attn.q
    assert torch.equal(fast.weight.view(torch.uint8), q.weight.view(torch.uint8))
    assert torch.all(fast.weight_scale == q.weight_scale)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])  # measured 3.1e-3, 3.4e-4
def test_half_precision_weights(dtype, bound, model, inputs, reference, tmp_path):
    path = write({k: v.to(dtype) for k, v in wan_state(model).items()}, tmp_path / "half.safetensors")
    loaded = load_wan_model(path, **TINY)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert relative_error(forward(loaded, inputs), reference) < bound
    cast = load_wan_model(write(wan_state(model), tmp_path / "full.pt"), weight_dtype=dtype, **TINY)
    assert {p.dtype for p in cast.parameters()} == {dtype}


# -- bad files ----------------------------------------------------------------------------------------------------
def refused(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_wan_model(path, **{**TINY, **kwargs})
    message = str(info.value)
    assert Path(path).name in message and "Layouts tried" in message and "diffusers" in message
    assert "What to do" in message
    return message


def test_nonexistent_file(tmp_path):
    assert "does not exist" in refused(tmp_path / "nope.safetensors")


def test_truncated_safetensors(model, tmp_path):
    path = write(wan_state(model), tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "could not be read" in refused(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_garbage_bytes(suffix, tmp_path):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(os.urandom(4096))
    assert "could not be read" in refused(path)


def test_vae_like_file(tmp_path):
    vae = {"encoder.conv1.weight": torch.zeros(96, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(384, 16, 3, 3, 3)}
    path = write(vae, tmp_path / "wan_2.1_vae.safetensors")
    message = refused(path)
    assert "encoder.conv1.weight" in message and "VAE" in message


def test_text_encoder_and_unknown_files_given_as_the_dit(tmp_path):
    umt5 = {"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}
    message = refused(write(umt5, tmp_path / "umt5_xxl_fp16.safetensors"))
    assert "looks like a text encoder" in message and "--text-encoder" in message
    message = refused(write({"proj.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors"))
    assert "looks like" not in message and "none of its keys belong to a Wan2.1 DiT" in message


def test_missing_keys(model, tmp_path):
    state = wan_state(model)
    del state["blocks.1.ffn.2.bias"], state["blocks.0.self_attn.norm_k.weight"]
    message = refused(write(state, tmp_path / "missing.safetensors"))
    assert "2 missing keys" in message and "blocks.1.ffn.2.bias" in message


def test_wrong_shape(model, tmp_path):
    state = wan_state(model)
    state["blocks.1.ffn.0.weight"] = torch.zeros(50, 48)
    message = refused(write(state, tmp_path / "shape.safetensors"))
    assert "wrong shapes" in message and "blocks.1.ffn.0.weight (file [50, 48], model [96, 48])" in message


def test_packed_weights_and_files_without_the_shape_keys_are_refused(model, tmp_path):
    state = wan_state(model)
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"].to(torch.int8)  # an int8/packed quantization
    assert "non-float (packed or quantized) weights, not supported: blocks.0.ffn.0.weight" in refused(
        write(state, tmp_path / "int8.safetensors"))
    state = wan_state(model)
    del state["head.head.weight"]
    assert "missing keys that the model's shape is read from: head.head.weight" in refused(
        write(state, tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="weight_dtype must be a floating dtype"):
        load_wan_model(tmp_path / "cut.safetensors", weight_dtype=torch.int8, **TINY)


def test_unexpected_keys_listed_with_a_count(model, tmp_path):
    state = wan_state(model)
    state.update({f"blocks.0.lora_{i}.weight": torch.zeros(2) for i in range(8)})
    message = refused(write(state, tmp_path / "extra.safetensors"))
    assert "8 unexpected keys" in message and "blocks.0.lora_0.weight" in message and "(and 3 more)" in message


def test_config_that_does_not_fit(model, tmp_path):
    path = write(wan_state(model), tmp_path / "m.safetensors")
    assert "wrong shapes" in refused(path, config=model.cfg.with_(ffn_dim=64))


def test_head_dim_that_does_not_divide(model, tmp_path):
    message = refused(write(wan_state(model), tmp_path / "m.safetensors"), head_dim=128)
    assert "not a multiple of head_dim 128" in message
    assert "head_dim must be a positive number of channels, got 0" in refused(tmp_path / "m.safetensors", head_dim=0)


def test_a_dit_of_other_latents_than_the_wan21_vaes_is_refused_at_load(tmp_path):
    """Wan2.2 TI2V-5B reads 48-channel latents: it used to denoise a whole video and then fail in the VAE."""
    state = wan_state(tiny_model(cfg=MODEL_PRESETS["tiny"].with_(in_dim=48, out_dim=48)))
    assert "it reads 48- and writes 48-channel latents, and the Wan2.1 VAE's have 16" in refused(
        write(state, tmp_path / "wan22_ti2v.safetensors"))


def test_image_to_video_checkpoint(model, tmp_path):
    state = wan_state(model)
    state["patch_embedding.weight"] = torch.zeros(48, 36, 1, 2, 2)
    state["img_emb.proj.1.weight"] = torch.zeros(48, 64)
    assert "image-to-video" in refused(write(state, tmp_path / "i2v.safetensors"))


def test_scaled_fp8_scale_of_a_wrong_shape(model, tmp_path):
    state = scaled_fp8(wan_state(model))
    state["blocks.0.ffn.0.scale_weight"] = torch.ones(3)
    assert "blocks.0.ffn.0.scale_weight [3]" in refused(write(state, tmp_path / "scaled.safetensors"))


class Payload:
    """Unpickling this would create ``marker``: proves weights_only refused it before running anything. With
    ``shell``, through os.system, whose module torch names as blocked (another wording of the refusal)."""

    def __init__(self, marker: Path, shell: bool = False) -> None:
        self.marker, self.shell = marker, shell

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",)) if self.shell else (open, (str(self.marker), "w"))


@pytest.mark.parametrize("shell, refused_name", [(False, "io.open"), (True, "posix.system")])
def test_pickle_with_an_arbitrary_object_is_refused(model, tmp_path, shell, refused_name):
    marker = tmp_path / "pwned"
    evil = {"generator_ema": prefixed(wan_state(model), "model."), "extra": Payload(marker, shell)}
    path = write(evil, tmp_path / "evil.pt")
    message = refused(path)
    assert f"refused to unpickle {refused_name}" in message and "download it again" not in message
    assert not marker.exists()


def test_a_file_named_as_the_other_container_is_told_to_be_renamed(model, tmp_path):
    """A renamed download used to be called truncated or corrupt ("download it again")."""
    torch_file = write(wan_state(model), tmp_path / "m.pt").rename(tmp_path / "torch.safetensors")
    safetensors_file = write(wan_state(model), tmp_path / "m.safetensors").rename(tmp_path / "safetensors.pt")
    message = refused(torch_file)
    assert "a PyTorch (torch.save) file with a .safetensors name" in message and "rename it to .pt" in message
    message = refused(safetensors_file)
    assert "a safetensors file with a .pt name" in message and "rename it to .safetensors" in message


def test_a_file_without_tensors(tmp_path):
    assert "the file holds no tensors" in refused(write({}, tmp_path / "empty.pt"))


def test_dict_of_non_tensors(tmp_path):
    message = refused(write({"config": {"dim": 48}, "steps": 3}, tmp_path / "odd.pt"))
    assert "not all tensors" in message and "config" in message


def test_fp8_file_asked_for_fp8_is_used_as_stored(model, inputs, tmp_path):
    """Asking for fp8 storage of a file already in e4m3fn keeps its bits: quantizing them again (a scale per row,
    a second rounding) would move the weights for nothing."""
    fp8_state = fp8_linear_weights(wan_state(model))
    path = write(fp8_state, tmp_path / "fp8.safetensors")
    asked = load_wan_model(path, weight_dtype=FP8, **TINY)
    q = asked.blocks[0].self_attn.q
    assert torch.equal(q.weight.view(torch.uint8), fp8_state["blocks.0.self_attn.q.weight"].view(torch.uint8))
    assert q.weight_scale is None
    assert torch.equal(forward(asked, inputs), forward(load_wan_model(path, **TINY), inputs))


def test_a_legacy_pickle_torch_file_with_a_safetensors_name_is_told_to_be_renamed(model, tmp_path):
    """torch.save's pre-1.6 format is a bare pickle (first byte 0x80, no 'PK' zip header): renamed to .safetensors it
    is a torch file too, not a truncated one."""
    path = tmp_path / "legacy.safetensors"
    torch.save(wan_state(model), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    message = refused(path)
    assert "a PyTorch (torch.save) file with a .safetensors name" in message and "rename it to .pt" in message


def test_a_dit_that_reads_wan21_latents_but_writes_others_is_refused(tmp_path):
    """The latent check holds both ends: the input conv can be Wan2.1's while the head writes another latent size
    (its output would fail only in the VAE, after a whole video); the message names each count."""
    state = wan_state(tiny_model(cfg=MODEL_PRESETS["tiny"].with_(in_dim=16, out_dim=48)))
    assert "it reads 16- and writes 48-channel latents" in refused(write(state, tmp_path / "odd_head.safetensors"))
