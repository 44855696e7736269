"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming == whole, tiling, previews, checkpoint loading.

All on a tiny random VAE (base_dim 8, the real dim_mult / num_res_blocks / z_dim, because diffusers' converter
hard-codes the decoder block layout), fp32 on CPU.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from histream_core.vae import (LATENT_RGB_BIAS, LATENTS_MEAN, LATENTS_STD, TiledDecoder, VAECheckpointError, WanVAE,
                               WanVAEConfig, denormalize, frames_to_images, images_to_frames, latent_preview,
                               load_vae, normalize, tile_spans, wan_state_dict_from_diffusers)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

# fp32 parity with diffusers. Measured on this CPU: encode max abs error ~5e-7 (latents up to ~2),
# decode ~3e-6 (frames in [-1, 1]); the gap is float rounding from different conv padding paths.
PARITY_ATOL = 1e-5
PARITY_RTOL = 1e-5
# Tiled (tile 8, overlap 4 latent px) vs untiled decode of an 8x12 latent on the tiny random VAE. Measured:
# max abs error 0.70, mean 0.066 (butting 6-px tiles without overlap: 1.64 / 0.155). The tiny random VAE mixes the
# whole (small) frame through its middle attention and has a receptive field (~17 latent px) wider than the tile,
# so this is a regression bound on the blending, not the quality to expect from the real VAE at 1080p.
TILED_MAX_ERR = 0.85
TILED_MEAN_ERR = 0.08

TINY = WanVAEConfig(base_dim=8)


def randomize_(vae: WanVAE, seed: int = 0) -> WanVAE:
    """Random, well-scaled values for every parameter, norms included (Wan's ones/zeros would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            else:
                p.copy_(0.1 * noise)
    return vae


def tiny_vae(seed: int = 0) -> WanVAE:
    return randomize_(WanVAE(TINY), seed).eval()


def to_diffusers(vae: WanVAE) -> AutoencoderKLWan:
    ref = AutoencoderKLWan(base_dim=vae.config.base_dim, z_dim=vae.config.z_dim).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    return ref


def rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny ops: one thread is faster, and far faster when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return tiny_vae()


@pytest.fixture(scope="module")
def ref(vae: WanVAE) -> AutoencoderKLWan:
    return to_diffusers(vae)


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return rand(1, 3, 13, 32, 48).tanh()  # [B, 3, 1 + 4*3, H, W] in (-1, 1)


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return rand(1, 16, 5, 4, 6, seed=2)  # [B, 16, T_latent, h, w]


# ----------------------------------------------------------------------------------------------- config and names

def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="base_dim"):
        WanVAEConfig(base_dim=0)
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="even"):
        WanVAEConfig(base_dim=3, dim_mult=(1, 3), temporal_downsample=(True,))
    assert (WanVAEConfig().spatial_factor, WanVAEConfig().temporal_factor) == (8, 4)


def test_parameter_names_are_wans(vae: WanVAE) -> None:
    names = set(vae.state_dict())
    for key in ("conv1.weight", "conv2.bias", "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
                "encoder.downsamples.3.shortcut.weight", "encoder.downsamples.5.time_conv.weight",
                "encoder.downsamples.2.resample.1.weight", "encoder.middle.1.to_qkv.weight", "encoder.head.2.weight",
                "decoder.middle.2.residual.6.weight", "decoder.upsamples.3.time_conv.weight",
                "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
                "decoder.upsamples.14.residual.3.gamma", "decoder.head.0.gamma"):
        assert key in names, key
    assert "encoder.downsamples.2.time_conv.weight" not in names  # stage 0 halves space only


# ---------------------------------------------------------------------------------------- parity with diffusers

def test_encode_matches_diffusers(vae: WanVAE, ref: AutoencoderKLWan, video: torch.Tensor) -> None:
    ours = vae.encode(video)
    with torch.no_grad():
        theirs = ref.encode(video).latent_dist.mode()
    assert ours.shape == theirs.shape == (1, 16, 4, 4, 6)
    torch.testing.assert_close(ours, theirs, atol=PARITY_ATOL, rtol=PARITY_RTOL)


def test_decode_matches_diffusers(vae: WanVAE, ref: AutoencoderKLWan, latents: torch.Tensor) -> None:
    ours = vae.decode(latents)
    with torch.no_grad():
        theirs = ref.decode(latents).sample
    assert ours.shape == theirs.shape == (1, 3, 17, 32, 48)
    assert theirs.std() > 0.1  # not a degenerate (e.g. all-clamped) output
    torch.testing.assert_close(ours, theirs, atol=PARITY_ATOL, rtol=PARITY_RTOL)


def test_diffusers_key_map_round_trips(vae: WanVAE) -> None:
    original = vae.state_dict()
    back = wan_state_dict_from_diffusers(convert_wan_vae_to_diffusers(dict(original)))
    assert set(back) == set(original)
    assert all(back[k] is original[k] for k in original)


def test_loads_diffusers_state_dict(vae: WanVAE, ref: AutoencoderKLWan, latents: torch.Tensor, tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = load_vae(path)
    assert loaded.config == vae.config
    assert torch.equal(loaded.decode(latents), vae.decode(latents))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), ref.decode(latents).sample,
                                   atol=PARITY_ATOL, rtol=PARITY_RTOL)


# ----------------------------------------------------------------------------------------- streaming == whole

def _stream_decode(decoder, latents: torch.Tensor, bounds: list[int], **kwargs) -> torch.Tensor:
    state, out = decoder.initial_state(), []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        frames, state = decoder.decode_chunk(latents[:, :, start:stop], state, **kwargs)
        out.append(frames)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("bounds", [[0, 1, 3, 5], [0, 3, 5], [0, 1, 2, 3, 4, 5]])
def test_streaming_decode_equals_whole(vae: WanVAE, latents: torch.Tensor, bounds: list[int]) -> None:
    whole = vae.decode(latents)
    streamed = _stream_decode(vae, latents, bounds)
    assert streamed.shape == whole.shape
    assert torch.equal(streamed, whole)  # same passes, same math: bit-identical in fp32


def test_streaming_decode_multi_frame_passes(vae: WanVAE, latents: torch.Tensor) -> None:
    """Several latent frames per pass exercise the multi-frame cache paths; equal up to conv rounding."""
    whole = vae.decode(latents)
    for fpp in (None, 2):
        torch.testing.assert_close(_stream_decode(vae, latents, [0, 3, 5], frames_per_pass=fpp), whole,
                                   atol=1e-5, rtol=0)


def test_fresh_decode_per_chunk_is_detected(vae: WanVAE, latents: torch.Tensor) -> None:
    """The wrong approach (a fresh whole-video decode per chunk) loses the causal history: the check above
    would fail on it by a visible margin, in both frame count and pixels."""
    whole = vae.decode(latents)
    naive = torch.cat([vae.decode(latents[:, :, 0:3]), vae.decode(latents[:, :, 3:5])], dim=2)
    assert naive.shape[2] == whole.shape[2] - 3  # the second chunk's first latent frame becomes 1 frame, not 4
    assert (naive[:, :, -4:] - whole[:, :, -4:]).abs().max() > 0.05  # last latent frame's 4 frames


def test_decode_chunk_leaves_state_untouched(vae: WanVAE, latents: torch.Tensor) -> None:
    _, state = vae.decode_chunk(latents[:, :, :2], vae.initial_state())
    first, _ = vae.decode_chunk(latents[:, :, 2:4], state)
    again, _ = vae.decode_chunk(latents[:, :, 2:4], state)
    assert torch.equal(first, again)
    assert state.frames_in == 2 and state.started


def test_stream_rejects_a_different_video(vae: WanVAE, latents: torch.Tensor) -> None:
    _, state = vae.decode_chunk(latents[:, :, :1], vae.initial_state())
    with pytest.raises(ValueError, match="initial_state"):
        vae.decode_chunk(latents[:, :, 1:2, :2], state)
    with pytest.raises(ValueError, match="raw Wan latents"):
        vae.decode_chunk(latents[:, :8], vae.initial_state())


def test_streaming_encode_equals_whole(vae: WanVAE, video: torch.Tensor) -> None:
    whole = vae.encode(video)
    for bounds in ([0, 1, 5, 9, 13], [0, 5, 13], [0, 9, 13]):
        state, out = vae.initial_state(), []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            lat, state = vae.encode_chunk(video[:, :, start:stop], state)
            out.append(lat)
        assert torch.equal(torch.cat(out, dim=2), whole), bounds
    # Wrong approach: encoding frames 4..12 as a fresh video drops the history of frames 0..3.
    naive = vae.encode(video[:, :, 4:13])
    assert (naive[:, :, -1] - whole[:, :, -1]).abs().max() > 0.05


def test_encode_chunk_sizes_are_checked(vae: WanVAE, video: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode_chunk(video[:, :, :4], vae.initial_state())
    _, state = vae.encode_chunk(video[:, :, :5], vae.initial_state())
    with pytest.raises(ValueError, match="4k frames"):
        vae.encode_chunk(video[:, :, 5:10], state)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video[:, :, :, :, :44])


# ----------------------------------------------------------------------------------------------------- tiling

def test_tile_spans_cover_with_overlap() -> None:
    for length, tile, overlap in [(136, 64, 16), (240, 64, 16), (12, 8, 4), (16, 6, 3), (9, 9, 2), (5, 8, 2)]:
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(b - a == min(tile, length) for a, b in spans)
        assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))


def test_blend_weights_cross_fade_to_one_across_each_overlap() -> None:
    """Linear ramps across an overlap: the neighbours' weights sum to one at every pixel (a cross-fade), and both
    tiles contribute to every overlapped pixel (no pixel of the overlap taken from one tile alone)."""
    from histream_core.vae.tiling import _blend_ramp
    for length, tile, overlap in [(136, 64, 16), (240, 64, 16), (12, 8, 4), (30, 8, 2)]:  # overlaps up to half a tile
        spans = tile_spans(length, tile, overlap)
        total, covering = torch.zeros(8 * length), torch.zeros(8 * length)
        for index, (start, stop) in enumerate(spans):
            ramp = _blend_ramp(spans, index, 8)
            total[8 * start:8 * stop] += ramp
            covering[8 * start:8 * stop] += ramp > 0
        torch.testing.assert_close(total, torch.ones_like(total))
        shared = sum(8 * (prev[1] - nxt[0]) for prev, nxt in zip(spans, spans[1:]))
        assert int((covering == 2).sum()) == shared, (length, tile, overlap)


def test_one_tile_is_exact(vae: WanVAE, latents: torch.Tensor) -> None:
    assert torch.equal(TiledDecoder(vae, tile=6, overlap=2).decode(latents), vae.decode(latents))


def test_tiled_decode_error_is_bounded(vae: WanVAE) -> None:
    lat = rand(1, 16, 2, 8, 12, seed=3)
    whole = vae.decode(lat)
    blended = (TiledDecoder(vae, tile=8, overlap=4).decode(lat) - whole).abs()
    seams = (TiledDecoder(vae, tile=6, overlap=0).decode(lat) - whole).abs()  # columns (0, 6), (6, 12)
    assert blended.max() < TILED_MAX_ERR and blended.mean() < TILED_MEAN_ERR
    assert blended.mean() < seams.mean()  # overlap + blending beats butting tiles together


def test_tiled_streaming_equals_tiled_whole(vae: WanVAE) -> None:
    lat = rand(1, 16, 3, 8, 10, seed=4)
    tiled = TiledDecoder(vae, tile=6, overlap=2)  # 2 x 2 tiles, each with its own causal state
    assert torch.equal(_stream_decode(tiled, lat, [0, 1, 3]), tiled.decode(lat))


def test_tiled_stream_calls_before_pass_for_each_pass_of_each_tile(vae: WanVAE) -> None:
    """The hook where a caller reports progress or stops: a segment's frames come out only after all its tiles."""
    lat = rand(1, 16, 3, 8, 10, seed=4)  # 2 x 2 tiles
    calls = []
    tiled = TiledDecoder(vae, tile=6, overlap=2, segment_frames=2,
                         before_pass=lambda done, chunks: calls.append((done, chunks)))
    list(tiled.decode_stream(lat.split(1, dim=2)))  # segments: chunks 1-2 (2 passes a tile), then chunk 3 (1 pass)
    assert calls == [((k + i / 2) / 4, 2) for k in range(4) for i in range(2)] + [(k / 4, 1) for k in range(4)]

    def stop(done, chunks):
        if done > 0.3:
            raise KeyboardInterrupt

    tiled.before_pass, decoded = stop, []
    with pytest.raises(KeyboardInterrupt):
        decoded.extend(tiled.decode_stream(lat.split(1, dim=2)))
    assert decoded == []  # stopped inside the first segment, before any of its frames


def test_tiled_decoder_validates() -> None:
    with pytest.raises(ValueError, match="overlap"):
        TiledDecoder(WanVAE(TINY), tile=8, overlap=8)


# --------------------------------------------------------------------------------- latent format and previews

def test_latent_format_matches_comfyui_and_diffusers(latents: torch.Tensor) -> None:
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert tuple(defaults["latents_mean"].default) == LATENTS_MEAN
    assert tuple(defaults["latents_std"].default) == LATENTS_STD
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(normalize(latents), (latents - mean) * 1.0 / std)  # ComfyUI Wan21.process_in
    torch.testing.assert_close(denormalize(normalize(latents)), latents)


def test_preview_shape_and_range(latents: torch.Tensor) -> None:
    rgb = latent_preview(latents, space="raw")
    assert rgb.shape == (1, 5, 4, 6, 3) and rgb.dtype == torch.float32
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0 and rgb.std() > 0.01
    as_bytes = latent_preview(normalize(latents), space="normalized", as_uint8=True)
    assert as_bytes.dtype == torch.uint8 and as_bytes.shape == rgb.shape
    assert (as_bytes.int() - (rgb * 255).round().int()).abs().max() <= 1
    zero = latent_preview(torch.zeros(1, 16, 1, 1, 1), space="normalized")  # only the bias is left
    torch.testing.assert_close(zero.flatten(), (torch.tensor(LATENT_RGB_BIAS) + 1) / 2)
    with pytest.raises(ValueError, match="space"):
        latent_preview(latents, space="model")  # type: ignore[arg-type]


def test_frames_to_comfy_images() -> None:
    frames = rand(2, 3, 5, 8, 16).clamp(-1, 1)
    images = frames_to_images(frames)
    assert images.shape == (10, 8, 16, 3) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images[6], (frames[1, :, 1].permute(1, 2, 0) + 1) / 2)  # video 1, frame 1
    torch.testing.assert_close(images_to_frames(images[:5]), frames[:1])


# --------------------------------------------------------------------------------------------- checkpoints

def test_loads_wan_layout_safetensors_and_pth(vae: WanVAE, latents: torch.Tensor, tmp_path) -> None:
    from safetensors.torch import save_file

    sd = vae.state_dict()
    save_file(sd, str(tmp_path / "wan_2.1_vae.safetensors"))
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    save_file({"vae." + k: v for k, v in sd.items()}, str(tmp_path / "bundle.safetensors"))
    expected = vae.decode(latents)
    for name in ("wan_2.1_vae.safetensors", "Wan2.1_VAE.pth", "bundle.safetensors"):
        loaded = load_vae(tmp_path / name)
        assert loaded.config == TINY and not loaded.training
        assert torch.equal(loaded.decode(latents), expected), name
    half = load_vae(tmp_path / "wan_2.1_vae.safetensors", dtype=torch.bfloat16)
    assert half.conv2.weight.dtype == torch.bfloat16


def test_loads_a_vae_bundled_under_first_stage_model(vae: WanVAE, tmp_path) -> None:
    """Bundled checkpoints may nest the VAE under 'first_stage_model.', as whole Stable Diffusion-style files do."""
    from safetensors.torch import save_file

    save_file({"first_stage_model." + k: v for k, v in vae.state_dict().items()}, str(tmp_path / "bundle.safetensors"))
    loaded = load_vae(tmp_path / "bundle.safetensors")
    assert loaded.config == TINY
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())


def _expect_error(path, *fragments: str) -> str:
    with pytest.raises(VAECheckpointError) as info:
        load_vae(path)
    message = str(info.value)
    assert str(path) in message and "wan_2.1_vae.safetensors" in message and "models/vae" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_missing_and_unreadable_files(tmp_path) -> None:
    from safetensors.torch import save_file

    _expect_error(tmp_path / "nope.safetensors", "does not exist")
    _expect_error(tmp_path, "is a folder, not a file")
    save_file({"a": torch.zeros(1000)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "vae.onnx").write_bytes(b"\0")
    _expect_error(tmp_path / "vae.onnx", "unsupported file type")


class _NotATensor:
    pass


def test_pickles_are_loaded_weights_only(tmp_path) -> None:
    torch.save({"encoder.conv1.weight": _NotATensor()}, tmp_path / "evil.pth")
    _expect_error(tmp_path / "evil.pth", "refused to unpickle")


def test_wrong_kind_of_checkpoint(tmp_path) -> None:
    from safetensors.torch import save_file

    dit = {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}
    save_file(dit, str(tmp_path / "wan2.1_t2v_1.3B.safetensors"))
    msg = _expect_error(tmp_path / "wan2.1_t2v_1.3B.safetensors", "diffusers", "wan (original", "encoder.conv1.weight",
                        "blocks.0.self_attn.q.weight", "diffusion model")
    assert "not a Wan2.1 VAE" in msg
    torch.save({"foo": torch.zeros(2)}, tmp_path / "random.pt")
    _expect_error(tmp_path / "random.pt", "not a Wan2.1 VAE", "foo")
    # Wan's own umT5 file has blocks.N keys too (blocks.0.attn.q): it is the text encoder, not a DiT
    umt5 = {"token_embedding.weight": torch.zeros(8, 4), "blocks.0.attn.q.weight": torch.zeros(4, 4)}
    torch.save(umt5, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    msg = _expect_error(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", "looks like a text encoder checkpoint")
    assert "diffusion model" not in msg


def test_wan22_and_text_encoder_files_given_as_the_vae_are_named(tmp_path) -> None:
    from safetensors.torch import save_file

    wan22 = {"encoder.conv1.weight": torch.zeros(8, 12, 3, 3, 3), "conv2.weight": torch.zeros(48, 48, 1, 1, 1)}
    save_file(wan22, str(tmp_path / "wan2.2_vae.safetensors"))
    _expect_error(tmp_path / "wan2.2_vae.safetensors", "Wan2.2's 48-channel VAE is not supported")
    save_file({"shared.weight": torch.zeros(8, 4)}, str(tmp_path / "umt5.safetensors"))
    _expect_error(tmp_path / "umt5.safetensors", "looks like a text encoder checkpoint")
    cut = {"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3)}  # a Wan2.1 VAE without its conv2
    save_file(cut, str(tmp_path / "cut_vae.safetensors"))
    msg = _expect_error(tmp_path / "cut_vae.safetensors", "'conv2.weight', which gives the latent channels, is missing")
    assert "Wan2.2" not in msg


def test_incomplete_vae_lists_keys(vae: WanVAE, tmp_path) -> None:
    from safetensors.torch import save_file

    sd = dict(vae.state_dict())
    del sd["decoder.head.2.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["decoder.conv1.bias"] = torch.zeros(5)
    save_file(sd, str(tmp_path / "broken.safetensors"))
    _expect_error(tmp_path / "broken.safetensors", "1 missing keys: decoder.head.2.weight",
                  "1 unexpected keys: decoder.extra.weight", "decoder.conv1.bias (file [5], model [", "wan layout")
    sd = dict(vae.state_dict())
    sd["decoder.head.2.weight"] = sd["decoder.head.2.weight"].to(torch.int8)
    save_file(sd, str(tmp_path / "int8.safetensors"))
    _expect_error(tmp_path / "int8.safetensors", "non-float (packed or quantized) weights",
                  "decoder.head.2.weight")


def test_decode_stream_owns_its_state_and_equals_whole_decode(vae: WanVAE, latents: torch.Tensor) -> None:
    """decode_stream (which frees caches as it goes) gives decode_chunk's frames, untiled and tiled."""
    whole = vae.decode(latents)
    pieces = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    assert torch.equal(torch.cat(list(vae.decode_stream(iter(pieces))), dim=2), whole)
    tiled = TiledDecoder(vae, tile=6, overlap=2)
    state, by_chunk = tiled.initial_state(), []
    for piece in pieces:
        frames, state = tiled.decode_chunk(piece, state)
        by_chunk.append(frames)
    assert torch.equal(torch.cat(list(tiled.decode_stream(iter(pieces))), dim=2), torch.cat(by_chunk, dim=2))
    with pytest.raises(ValueError, match="initial_state"):
        list(vae.decode_stream(iter([latents[:, :, :1], latents[:, :, 1:2, :2]])))


def test_no_decode_path_records_autograd(vae: WanVAE, latents: torch.Tensor) -> None:
    """With grad mode on (a plain Python caller), streamed decodes must not build graphs: through the causal caches
    a graph would keep every earlier pass's activations alive (TiledDecoder.decode_stream once did)."""
    assert torch.is_grad_enabled() and next(vae.parameters()).requires_grad
    pieces = [latents[:, :, :1], latents[:, :, 1:]]
    tiled = TiledDecoder(vae, tile=6, overlap=2)
    outputs = [*vae.decode_stream(iter(pieces)), *tiled.decode_stream(iter(pieces)), vae.decode(latents),
               tiled.decode(latents), tiled.decode_chunk(latents, tiled.initial_state())[0]]
    assert not any(frames.requires_grad for frames in outputs)


def test_tiled_stream_in_segments_parks_caches_and_stays_exact(vae: WanVAE) -> None:
    """Segments of 2 latent frames over chunks of 1, 2, 2: the 2 x 2 tiles continue their streams from host-parked
    caches and give the per-chunk tiled decode's frames bit for bit, one output per input chunk."""
    latents = rand(1, 16, 5, 8, 10, seed=6)
    pieces = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    tiled = TiledDecoder(vae, tile=6, overlap=2, segment_frames=2)
    assert len(tile_spans(8, 6, 2)) == len(tile_spans(10, 6, 2)) == 2
    state, by_chunk = tiled.initial_state(), []
    for piece in pieces:
        frames, state = tiled.decode_chunk(piece, state)
        by_chunk.append(frames)
    streamed = list(tiled.decode_stream(iter(pieces)))
    assert [f.shape[2] for f in streamed] == [f.shape[2] for f in by_chunk] == [1, 8, 8]
    for got, want in zip(streamed, by_chunk):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="segment_frames"):
        TiledDecoder(vae, segment_frames=0)


def test_tiled_stream_holds_one_tiles_caches() -> None:
    """Counted on the meta device: a tiled stream of a wide video needs well under the untiled stream's memory
    (it once kept every tile's caches on the device, which made it need more)."""
    from histream_core.memory import LiveTensorBytes, fused_attention_on_meta
    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta(), torch.device("meta"):
        vae = WanVAE(WanVAEConfig(base_dim=8)).eval()
        chunks = [torch.empty(1, 16, 2, 48, 96) for _ in range(2)]
        peaks = []
        for decoder in (vae, TiledDecoder(vae, tile=32, overlap=8, segment_frames=2)):
            meter.reset_peak()
            for _ in decoder.decode_stream(iter(chunks)):
                pass
            peaks.append(meter.peak - meter.live)
    untiled, tiled = peaks
    assert tiled < 0.3 * untiled, (tiled, untiled)


# ------------------------------------------------------------------------------------------- channels-last decode

class _ConvInputLayouts(TorchDispatchMode):
    """Records the convolutions whose input is not channels-last (cuDNN would convert those first)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.converted = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x = args[0]
            self.calls += 1
            if not x.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last):
                self.converted.append((tuple(x.shape), x.stride()))
        return func(*args, **(kwargs or {}))


def test_channels_last_decode_keeps_its_layout_and_its_frames(latents: torch.Tensor) -> None:
    """In bf16 (where the CPU's convolutions, like cuDNN's, return channels-last for channels-last input): no
    convolution gets an input it must convert, the stream equals the whole decode bit for bit, the error against
    fp32 is the NCDHW decode's, and switching back gives the NCDHW frames bit for bit."""
    vae = tiny_vae()
    expected = vae.decode(latents)
    vae.to(torch.bfloat16)
    ncdhw = vae.decode(latents)
    vae.set_channels_last()
    pieces = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    with _ConvInputLayouts() as layouts:
        streamed = torch.cat(list(vae.decode_stream(iter(pieces))), dim=2)
    assert layouts.calls > 100 and layouts.converted == []
    whole = vae.decode(latents)
    assert torch.equal(streamed, whole)
    assert whole.is_contiguous(memory_format=torch.channels_last_3d)
    error, ncdhw_error = ((frames.float() - expected).abs() for frames in (whole, ncdhw))
    assert error.mean() < 1.25 * ncdhw_error.mean() and error.max() < 2 * ncdhw_error.max()
    tiled = TiledDecoder(vae, tile=4, overlap=2)
    tiled_error = (tiled.decode(latents).float() - TiledDecoder(tiny_vae(), 4, 2).decode(latents)).abs()
    assert tiled_error.mean() < 1.25 * ncdhw_error.mean()
    assert torch.equal(vae.set_channels_last(False).decode(latents), ncdhw)


def test_channels_last_decode_needs_no_more_memory() -> None:
    """Buffers follow the input's layout, so the layout adds no conversion copies: the same peak, on meta."""
    from histream_core.memory import LiveTensorBytes, fused_attention_on_meta
    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta(), torch.device("meta"):
        vae = WanVAE(WanVAEConfig(base_dim=8)).eval().to(torch.bfloat16)
        chunks = [torch.empty(1, 16, 2, 24, 40) for _ in range(2)]
        peaks = []
        for channels_last in (False, True):
            vae.set_channels_last(channels_last)
            meter.reset_peak()
            for _ in vae.decode_stream(iter(chunks)):
                pass
            peaks.append(meter.peak - meter.live)
    assert peaks[1] <= peaks[0], peaks


def test_compiled_norms_give_the_eager_frames(latents: torch.Tensor) -> None:
    """compile_norms fuses each norm + SiLU into one kernel (inductor, on the CPU here): fp32 frames equal the eager
    ones up to float rounding, in both layouts and streamed; in bf16 it rounds once, so it is no less accurate."""
    import torch._dynamo

    vae = tiny_vae()
    expected = vae.decode(latents)
    torch._dynamo.utils.counters.clear()
    vae.compile_norms()
    torch.testing.assert_close(vae.decode(latents), expected, atol=2e-5, rtol=1e-5)
    pieces = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    streamed = torch.cat(list(vae.set_channels_last().decode_stream(iter(pieces))), dim=2)
    torch.testing.assert_close(streamed, expected, atol=2e-5, rtol=1e-5)
    vae.set_channels_last(False).to(torch.bfloat16)
    compiled_error = (vae.decode(latents).float() - expected).abs().mean()
    eager_error = (vae.compile_norms(False).decode(latents).float() - expected).abs().mean()
    assert compiled_error <= eager_error
    # dynamic shapes: not one graph per shape (the decoder has a dozen), at most two (a first pass with one frame
    # specializes) for each of fp32 NCDHW, fp32 channels-last and bf16 NCDHW
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 6


# ------------------------------------------------------------------------------- causal convs as conv2d (cuDNN)

def test_conv2d_formulation_gives_the_conv3d_frames(latents: torch.Tensor, video: torch.Tensor) -> None:
    """set_conv_impl("conv2d") runs every causal conv as a sum of conv2d over its time offsets: decode and encode
    equal the conv3d ones up to float rounding, streaming still equals the whole decode bit for bit, and the decode
    switched to channels-last (where the frames are read in place)."""
    vae = tiny_vae()
    decoded, encoded = vae.decode(latents), vae.encode(video)
    vae.set_conv_impl("conv2d")
    torch.testing.assert_close(vae.decode(latents), decoded, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(vae.encode(video), encoded, atol=2e-5, rtol=1e-5)
    assert vae.decode_layout == torch.channels_last_3d
    assert torch.equal(_stream_decode(vae, latents, [0, 1, 3, 5]), vae.decode(latents))
    with pytest.raises(ValueError, match="conv_impl"):
        vae.set_conv_impl("winograd")


def test_conv2d_formulation_holds_one_extra_output() -> None:
    """On meta: the conv2d formulation needs one output-sized temporary more than conv3d (at 1080p, bf16: 16.0 vs
    14.5 GiB for the decode), not one per time offset (it once held two: 1.2x here)."""
    from histream_core.memory import LiveTensorBytes, fused_attention_on_meta
    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta(), torch.device("meta"):
        vae = WanVAE(WanVAEConfig(base_dim=8)).eval().to(torch.bfloat16)
        peaks = []
        for impl in ("conv3d", "conv2d"):
            vae.set_conv_impl(impl)
            meter.reset_peak()
            for _ in vae.decode_stream(iter([torch.empty(1, 16, 2, 24, 40) for _ in range(2)])):
                pass
            peaks.append(meter.peak - meter.live)
    assert peaks[1] < 1.15 * peaks[0], peaks


@pytest.mark.parametrize(("device", "dtype", "version", "unreliable"), [
    ("cuda", torch.bfloat16, 91002, True), ("cuda", torch.float16, 90800, True),
    ("cuda", torch.bfloat16, 91401, True), ("cuda", torch.bfloat16, 91500, False),
    ("cuda", torch.bfloat16, 90701, False), ("cuda", torch.float32, 91002, False),
    ("cpu", torch.bfloat16, 91002, False), ("cuda", torch.bfloat16, None, False)])
def test_auto_conv_impl_avoids_only_the_unreliable_cudnn_versions(monkeypatch, device, dtype, version, unreliable):
    """cuDNN 9.8-9.14 half-precision 3D convolutions: wrong results or PyTorch's slow fallback (see the function)."""
    from histream_core.vae.layers import cudnn_conv3d_unreliable
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: version)
    assert cudnn_conv3d_unreliable(device, dtype) is unreliable


@pytest.mark.parametrize("keys, looks_like", [
    (["blocks.0.attn.q.weight", "blocks.0.attn.k.weight"], "looks like a text encoder checkpoint"),  # Wan umT5 blocks
    (["blocks.0.self_attn.q.weight", "blocks.0.cross_attn.q.weight"], "looks like a Wan diffusion model"),  # Wan DiT
    (["blocks.0.attn1.to_q.weight", "blocks.0.attn2.to_q.weight"], "looks like a Wan diffusion model"),  # diffusers
])
def test_each_key_pattern_alone_names_the_kind_of_file(tmp_path, keys, looks_like) -> None:
    """Each pattern of the hint is enough alone (a shard of the blocks has no embeddings): a file of only one
    model's block keys is still named."""
    from safetensors.torch import save_file

    save_file({key: torch.zeros(4, 4) for key in keys}, str(tmp_path / "blocks_only.safetensors"))
    _expect_error(tmp_path / "blocks_only.safetensors", looks_like)
