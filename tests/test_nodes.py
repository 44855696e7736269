"""ComfyUI nodes without ComfyUI: contracts, a tiny end-to-end run (Loader -> Sampler -> Chunk Decode), interrupts,
and the errors users see. The host modules are stubbed (comfy_stubs); the pack is imported as ComfyUI imports it."""

from __future__ import annotations

import inspect
import logging
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import imageio_ffmpeg
import numpy
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from comfy_stubs import ROOT, InterruptProcessingException, comfy_host, load_pack, pack_module  # noqa: F401
from conftest import needs_fp8_matmul, randomize_, tiny_model

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
SIZE = dict(width=64, height=64)
LENGTH = 13  # 4 latent frames: a chunk of 3 and a chunk of 1


def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


class StockVAE:
    """What the nodes use of ComfyUI's VAE object (comfy.sd.VAE)."""

    def __init__(self, model):
        self.first_stage_model = model


def wan_conditioning(tokens: int, width: int = 4096, seed: int = 0):
    """ComfyUI's Wan CONDITIONING: [1, max(512, tokens), width], zero past the prompt's tokens."""
    cond = torch.zeros(1, max(512, tokens), width)
    cond[:, :tokens] = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))
    return [[cond, {"pooled_output": None}]]


@pytest.fixture
def checkpoint(comfy_host):
    """A tiny random Wan DiT (head_dim 128 as real Wan, umT5 width 4096) in ComfyUI's key layout."""
    model = tiny_model(dim=256, num_heads=2, text_dim=4096)
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(comfy_host.models / "diffusion_models" / "tiny_wan.safetensors"))
    return "tiny_wan.safetensors"


@pytest.fixture
def loaded(checkpoint):
    return nodes()["HiStreamLoader"]().load(checkpoint, "default", "fp32", "sdpa", "main device")[0]


@pytest.fixture
def stock_vae():
    vae_module = pack_module("histream_core.vae")
    torch.manual_seed(0)
    return StockVAE(randomize_(vae_module.WanVAE(vae_module.WanVAEConfig(base_dim=8))).eval())


def sample(model, mode="histream", positive=None, **kwargs):
    args = dict(SIZE, length=LENGTH, mode=mode, seed=7, unique_id="5")
    args.update(kwargs)
    return nodes()["HiStreamDualResSampler"]().sample(model, positive or wan_conditioning(20), **args)


def decode(samples, vae, **kwargs):
    args = dict(tile_size=0, tile_overlap=128, save_mp4=False, filename_prefix="HiStream/test", fps=16.0, crf=19,
                preview_every=4, unique_id="9")
    args.update(kwargs)
    return nodes()["HiStreamVAEChunkDecode"]().decode({"samples": samples}, vae, **args)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# -- the pack and its contracts ---------------------------------------------------------------------------------------
def test_pack_imports_as_comfyui_does_without_comfyui():
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import comfy_stubs; "
            "pack = comfy_stubs.load_pack(); import histream_core; "
            "print(sorted(pack.NODE_CLASS_MAPPINGS), pack.WEB_DIRECTORY, "
            "[m for m in ('comfy', 'folder_paths', 'server') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['HiStreamAnchorWindow',", "'HiStreamCostReadout',", "'HiStreamDualResSampler',",
                                  "'HiStreamLoader',", "'HiStreamPromptSchedule',", "'HiStreamVAEChunkDecode']", "./web", "[]"]
    assert (ROOT / "web" / "histream.js").is_file() and (ROOT / "web" / "icon.svg").is_file()


NODE_IDS = ["HiStreamLoader", "HiStreamAnchorWindow", "HiStreamDualResSampler", "HiStreamVAEChunkDecode",
            "HiStreamCostReadout", "HiStreamPromptSchedule"]


def test_every_node_has_its_contract_checked(comfy_host):
    assert sorted(nodes()) == sorted(NODE_IDS)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_contract(comfy_host, node_id):
    pack = load_pack()
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("HiStream") and pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    schema = cls.INPUT_TYPES()
    assert set(schema) <= {"required", "optional", "hidden"}
    names = []
    for section in ("required", "optional"):
        for name, spec in schema.get(section, {}).items():
            names.append(name)
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, name
            kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
            assert options.get("tooltip"), f"{name} has no tooltip"
            if isinstance(kind, list):
                assert options.get("default", kind[0] if kind else None) in kind or not kind, name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
                if kind == "INT":
                    assert (options["default"] - options["min"]) % options.get("step", 1) == 0, name
            elif kind in ("STRING", "BOOLEAN"):
                assert "default" in options, name
            else:
                assert kind.isupper(), f"{name}: socket types are upper case, got {kind}"
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert cls.CATEGORY == "HiStream" and cls.DESCRIPTION
    signature = inspect.signature(getattr(cls, cls.FUNCTION))
    signature.bind(None, **{n: None for n in names}, **{n: None for n in schema.get("hidden", {})})


def test_sampler_mode_table_names_its_override_inputs(comfy_host):
    schema = nodes()["HiStreamDualResSampler"].INPUT_TYPES()
    table = schema["required"]["mode"][1]["histream_modes"]
    assert set(table) == set(schema["required"]["mode"][0])
    for knobs in table.values():
        assert set(knobs) <= set(schema["optional"])
    assert table["self-forcing"]["ntk_factor_high"] is None and table["histream+"]["later_chunk_steps"] == "1000|500"


# -- a run end to end -------------------------------------------------------------------------------------------------
def test_loader_sampler_decode_end_to_end(comfy_host, loaded, stock_vae):
    window = nodes()["HiStreamAnchorWindow"]().build(True, 3, 1, 2, "absolute")[0]
    out = sample(loaded, window=window)
    samples = out["result"][0]["samples"]
    assert samples.shape == (1, 16, 4, 8, 8) and samples.device.type == "cpu"

    # The LATENT is the engine's output in RAW (VAE) space, from the prompt's 20 tokens.
    core = pack_module("histream_core.sampler")
    cfg = pack_module("nodes.sampler").build_config("histream", window)
    expected = core.generate_video(loaded.model, wan_conditioning(20)[0][0][:, :20], **SIZE, frames=LENGTH, cfg=cfg,
                                   seed=7)
    torch.testing.assert_close(samples, pack_module("histream_core.vae").denormalize(expected))

    # Progress per model call (2 low, 2 high, then 2 cache passes except after the last chunk) plus one preview
    # per chunk.
    calls = [p for p in comfy_host.progress if p[2] is None]
    previews = [p for p in comfy_host.progress if p[2] is not None]
    assert [p[0] for p in calls] == list(range(1, 11)) and {p[1] for p in calls} == {10}
    assert len(previews) == 2 and previews[0][2][0] == "JPEG" and previews[0][2][1].size == (64, 64)
    events = [e for name, e in comfy_host.events if name == "histream.progress"]
    assert len(events) == 10 and events[-1]["chunk"] == 2 and events[-1]["num_chunks"] == 2
    assert events[-1]["cached_frames"] == 3 and events[0]["node"] == "5"
    assert out["ui"]["text"][0].startswith("histream: 2 chunks, 10 model calls")

    images = decode(samples, stock_vae)["result"][0]
    assert images.shape == (LENGTH, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_decode_streams_to_mp4_with_a_preview(comfy_host, stock_vae):
    latents = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    frames = decode(latents, stock_vae)["result"][0]
    out = decode(latents, stock_vae, save_mp4=True, preview_every=4)
    preview, path = out["result"]
    assert files_under(comfy_host.output) == ["HiStream/test_00001_.mp4"]
    assert path == str(comfy_host.output / "HiStream" / "test_00001_.mp4")
    assert out["ui"]["images"] == [{"filename": "test_00001_.mp4", "subfolder": "HiStream", "type": "output"}]
    torch.testing.assert_close(preview, frames[::4])  # frames 0, 4, 8, 12 (64 px: not shrunk)
    assert imageio_ffmpeg.count_frames_and_secs(path)[0] == LENGTH


def test_mp4_preview_of_a_wide_video_is_shrunk_to_512_px(comfy_host, stock_vae):
    """save_mp4 returns every Nth frame shrunk to fit 512 px (the path of every real video, which 64 px tests never
    take): 576x64 -> 512x57, area-averaged from the full-size frames."""
    latents = torch.randn(1, 16, 1, 8, 72, generator=torch.Generator().manual_seed(4))
    frames = decode(latents, stock_vae)["result"][0]  # [1, 64, 576, 3]
    preview, _ = decode(latents, stock_vae, save_mp4=True)["result"]
    assert preview.shape == (1, 57, 512, 3)
    expected = F.interpolate(frames.permute(0, 3, 1, 2), size=(57, 512), mode="area").permute(0, 2, 3, 1)
    torch.testing.assert_close(preview, expected)
    small = pack_module("nodes.decode").small
    assert small(frames[:1, :, :64]).shape == (1, 64, 64, 3)  # never enlarged


def test_tiled_decode_gives_the_same_frames_count(comfy_host, stock_vae):
    latents = torch.randn(1, 16, 2, 16, 8, generator=torch.Generator().manual_seed(2))
    images = decode(latents, stock_vae, tile_size=64, tile_overlap=32)["result"][0]
    assert images.shape == (5, 128, 64, 3)


def test_tiled_decode_uses_the_tile_and_overlap_asked_for(comfy_host, stock_vae):
    """tile_size and tile_overlap are pixels: the node's frames are the core's tiled decode at size // 8 latent px."""
    latents = torch.randn(1, 16, 2, 16, 8, generator=torch.Generator().manual_seed(2))
    images = decode(latents, stock_vae, tile_size=64, tile_overlap=24)["result"][0]  # 16 latent rows, overlap 3
    vae = pack_module("histream_core.vae")
    model = pack_module("nodes.decode").streaming_vae(stock_vae)
    expected = vae.frames_to_images(vae.TiledDecoder(model, tile=8, overlap=3).decode(latents))
    torch.testing.assert_close(images, expected)


def test_non_finite_frames_are_an_error_and_save_nothing(comfy_host, stock_vae):
    latents = torch.randn(1, 16, 2, 8, 8)
    vae = pack_module("nodes.decode").streaming_vae(stock_vae)
    with torch.no_grad():
        vae.decoder.head[2].weight.fill_(float("nan"))  # a damaged VAE file: finite latents, NaN frames
    with pytest.raises(ValueError, match="decoded frames of chunk 1 are NaN/inf"):
        decode(latents, stock_vae, save_mp4=True, filename_prefix="HiStream/nan/video")
    assert not list(comfy_host.output.rglob("*"))  # no file, and no folder ComfyUI made for it


def test_tiny_decoder_from_vae_approx(comfy_host, stock_vae):
    tiny = pack_module("histream_core.vae").TinyWanDecoder
    torch.manual_seed(5)
    save_file(tiny().state_dict(), str(comfy_host.models / "vae_approx" / "taew2_1.safetensors"))
    assert "taew2_1.safetensors" in nodes()["HiStreamVAEChunkDecode"].INPUT_TYPES()["optional"]["tiny_decoder"][0]
    latents = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    images = decode(latents, stock_vae, tiny_decoder="taew2_1.safetensors")["result"][0]
    assert images.shape == (13, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    out = decode(latents, stock_vae, tiny_decoder="taew2_1.safetensors", save_mp4=True)
    assert out["result"][1].endswith(".mp4")
    with pytest.raises(ValueError, match="VAE Chunk Decode, input 'tile_size'.*tiny decoder"):
        decode(latents, stock_vae, tiny_decoder="taew2_1.safetensors", tile_size=256)
    (comfy_host.models / "vae_approx" / "taesd_decoder.safetensors").write_bytes(b"not a tiny decoder")
    with pytest.raises(ValueError, match="VAE Chunk Decode, input 'tiny_decoder'"):
        decode(latents, stock_vae, tiny_decoder="taesd_decoder.safetensors")


def test_tiny_decoders_kept_are_at_most_two(comfy_host, monkeypatch):
    """Decoders are kept per file and dtype, but no more than two: a third file must not grow the cache."""
    module = pack_module("nodes.decode")
    monkeypatch.setattr(module, "_tiny_decoders", {})
    tiny = pack_module("histream_core.vae").TinyWanDecoder
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        save_file(tiny().state_dict(), str(comfy_host.models / "vae_approx" / name))
    first = module.cached_tiny_decoder("a.safetensors", torch.float32)
    assert module.cached_tiny_decoder("a.safetensors", torch.float32) is first
    module.cached_tiny_decoder("b.safetensors", torch.float32)
    module.cached_tiny_decoder("c.safetensors", torch.float32)
    assert len(module._tiny_decoders) <= 2
    assert module.cached_tiny_decoder("a.safetensors", torch.float32) is not first  # dropped, read again


def test_sampler_previews_with_the_tiny_preview_decoder(comfy_host, loaded):
    """Each chunk's preview is the last frame of TAEHV's preview decoder streamed over the chunks so far."""
    vae = pack_module("histream_core.vae")
    torch.manual_seed(6)
    save_file(vae.TinyWanDecoder().state_dict(), str(comfy_host.models / "vae_approx" / "taew2_1.safetensors"))
    out = sample(loaded, preview_decoder="taew2_1.safetensors")
    previews = [p[2][1] for p in comfy_host.progress if p[2] is not None]
    assert len(previews) == 2 and all(image.size == (64, 64) for image in previews)
    preview_decoder = vae.load_tiny_decoder(comfy_host.models / "vae_approx" / "taew2_1.safetensors", preview=True)
    last = preview_decoder.decode(out["result"][0]["samples"])[:, :, -1:]  # the whole video at once
    rgb = (vae.frames_to_images(last)[0] * 255).round().to(torch.uint8).numpy()  # [16, 16, 3]: 2x the latents
    expected = pack_module("nodes.sampler").Image.fromarray(rgb).resize((64, 64), 2)  # 2: bilinear
    assert abs(torch.tensor(numpy.asarray(previews[-1])).int() - torch.tensor(numpy.asarray(expected)).int()).max() <= 1
    with pytest.raises(ValueError, match="Dual-Res Sampler, input 'preview_decoder'"):
        (comfy_host.models / "vae_approx" / "broken.safetensors").write_bytes(b"garbage")
        sample(loaded, preview_decoder="broken.safetensors")


def test_stock_vae_is_rebuilt_once_per_object(comfy_host, stock_vae):
    module = pack_module("nodes.decode")
    first = module.streaming_vae(stock_vae)
    assert module.streaming_vae(stock_vae) is first
    assert module.streaming_vae(StockVAE(stock_vae.first_stage_model)) is not first


# -- interrupts -------------------------------------------------------------------------------------------------------
def test_interrupt_mid_decode_leaves_no_file(comfy_host, stock_vae):
    comfy_host.interrupt_after = 1  # the host's interrupt lands right after the first chunk
    latents = torch.randn(1, 16, 7, 8, 8)
    with pytest.raises(InterruptProcessingException):
        decode(latents, stock_vae, save_mp4=True)
    assert files_under(comfy_host.output) == []


def test_interrupt_mid_tiled_decode_stops_between_tiles(comfy_host, stock_vae):
    """A tiled decode works through a segment of up to 7 chunks tile by tile before any frames come out: the
    progress bar moves (in percent of a chunk) and stops can land before each pass of each tile."""
    latents = torch.randn(1, 16, 9, 16, 16, generator=torch.Generator().manual_seed(3))  # 3 chunks, one segment
    out = decode(latents, stock_vae, tile_size=64, tile_overlap=16)  # 3 x 3 tiles of 8 latent px, 9 passes each
    values = [value for value, _, _ in comfy_host.progress]
    assert len(values) == 9 * 9 + 3 and values == sorted(values) and values[-1] == 300
    assert values[:3] == [0, round(100 * 3 / 81), round(100 * 6 / 81)] and comfy_host.progress[-1][1] == 300
    comfy_host.progress.clear()
    comfy_host.interrupt_after = 3  # during the segment: before the third pass of its first tile
    (comfy_host.output / "Cut").mkdir()
    os.utime(comfy_host.output / "Cut", (1e9, 1e9))  # the artist's folder, made long ago
    with pytest.raises(InterruptProcessingException):
        decode(latents, stock_vae, tile_size=64, tile_overlap=16, save_mp4=True, filename_prefix="Cut/deep/video")
    assert len(comfy_host.progress) == 3  # stopped in the first tile
    assert list(comfy_host.output.rglob("*")) == [comfy_host.output / "Cut"]  # no file; "deep" (made for it) gone
    assert out["result"][0].shape[0] == 33


def test_interrupt_mid_chunk_stops_the_sampler(comfy_host, loaded):
    comfy_host.interrupt_after = 2  # after the second model call of chunk 1
    with pytest.raises(InterruptProcessingException):
        sample(loaded)
    assert len(comfy_host.progress) == 2


def test_sampler_checks_for_an_interrupt_before_each_model_call(comfy_host, loaded):
    comfy_host.interrupted = True  # the core's should_stop hook raises the host's exception before the first call
    with pytest.raises(InterruptProcessingException):
        sample(loaded)
    assert comfy_host.progress == []


# -- errors users see -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(width=1000), "input 'width': width 1000 does not fit the latent grid .* use 992 or 1024"),
    (dict(length=10), "input 'length': frames must be 4k\\+1 .* use 9 or 13"),
    (dict(mode="self-forcing", ntk_factor_high=3.0), "input 'ntk_factor_high': mode 'self-forcing' does not use it"),
    (dict(shift=0.0), "input 'shift': 0 is out of range: use a number in \\[0.1, 100\\] \\(the mode's value is 7\\); "
     "-1 takes the mode's value"),
    (dict(first_chunk_steps="1000,abc|500"), "input 'first_chunk_steps': cannot use '1000,abc\\|500'"),
    (dict(later_chunk_steps="500|1000"), "input 'later_chunk_steps': .*strictly decrease"),
    (dict(mode="no-drc", first_chunk_steps="1000|500"), "input 'first_chunk_steps': mode 'no-drc' has no low-res"),
    (dict(positive=wan_conditioning(20, width=768)), "input 'positive': .*umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    (dict(positive=[[torch.full((1, 512, 4096), float("nan")), {}]]), "input 'positive': the conditioning holds NaN"),
    (dict(width=192, low_res_scale=0.33), "input 'width': .* use 1600 or a low-res scale that divides evenly"),
])
def test_sampler_bad_inputs_name_the_input_and_the_fix(comfy_host, loaded, kwargs, message):
    with pytest.raises(ValueError, match=f"HiStream Dual-Res Sampler, {message}"):
        sample(loaded, **kwargs)
    assert comfy_host.progress == []  # refused before any model call


def test_sixteen_pixel_sizes_are_fine_without_drc(comfy_host, loaded):
    out = sample(loaded, mode="no-drc", width=48, length=5)
    assert out["result"][0]["samples"].shape == (1, 16, 2, 8, 6)


def test_past_the_trained_positions_is_said_in_the_node_text(comfy_host, loaded):
    notes = sample(loaded, mode="histream+", length=89)["ui"]["text"]  # 23 latent frames, absolute RoPE positions
    assert any(note.startswith("23 latent frames at absolute RoPE positions") for note in notes)
    assert len(sample(loaded, mode="histream+", length=81)["ui"]["text"]) == 1  # 21: the summary alone


def test_long_prompt_is_cut_and_said(comfy_host, loaded):
    out = sample(loaded, positive=wan_conditioning(600), length=1)
    assert "prompt cut: 600 tokens, the model reads the first 512" in out["ui"]["text"]


def test_conditioning_with_several_entries_or_prompts_uses_the_first_and_says_so(comfy_host, loaded):
    alone = sample(loaded, length=1)
    first, other = wan_conditioning(20), wan_conditioning(12, seed=1)
    combined = sample(loaded, positive=first + other, length=1)  # ConditioningCombine gives two entries
    assert "using the first of 2 conditioning entries" in combined["ui"]["text"]
    torch.testing.assert_close(combined["result"][0]["samples"], alone["result"][0]["samples"])
    batch = [[torch.cat([first[0][0], other[0][0]]), {}]]  # a batch of two prompts
    batched = sample(loaded, positive=batch, length=1)
    assert "using the first of 2 prompts in the conditioning batch" in batched["ui"]["text"]
    torch.testing.assert_close(batched["result"][0]["samples"], alone["result"][0]["samples"])


@pytest.mark.parametrize("positive, message", [
    ([], "no conditioning: connect a CLIPTextEncode"),
    ([[torch.zeros(1, 512, 4096), {}]], "the conditioning is all zeros"),  # e.g. ConditioningZeroOut
])
def test_sampler_refuses_missing_or_all_zero_conditioning(comfy_host, loaded, positive, message):
    # the node called directly: sample() replaces an empty positive with its default
    with pytest.raises(ValueError, match=f"HiStream Dual-Res Sampler, input 'positive': {message}"):
        nodes()["HiStreamDualResSampler"]().sample(loaded, positive, 64, 64, 1, "histream", 0)
    assert comfy_host.progress == []


def test_out_of_memory_says_what_to_change(comfy_host, loaded, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loaded.model, "forward", no_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory at 64x64: use fp8 weights"):
        sample(loaded)


def test_nan_latents_are_an_error_of_the_sampler_node(comfy_host, loaded):
    """The core's NonFiniteLatents comes out as an error naming the node, not as an internal exception's path."""
    with torch.no_grad():
        loaded.model.head.head.weight.fill_(float("nan"))  # a damaged checkpoint: finite inputs, NaN output
    with pytest.raises(ValueError, match="^HiStream Dual-Res Sampler: chunk 1 came out as NaN/inf"):
        sample(loaded)


def test_loader_rejects_a_vae_file(comfy_host, stock_vae):
    state = {k: v.contiguous() for k, v in stock_vae.first_stage_model.state_dict().items()}
    save_file(state, str(comfy_host.models / "diffusion_models" / "wan_2.1_vae.safetensors"))
    with pytest.raises(ValueError, match="(?s)HiStream Loader, input 'ckpt_name': .*looks like a VAE"):
        nodes()["HiStreamLoader"]().load("wan_2.1_vae.safetensors", "default", "fp32", "sdpa", "cpu")


def test_loader_reports_a_missing_attention_package(comfy_host, checkpoint):
    if importlib_available("sageattention"):
        pytest.skip("sageattention is installed here")
    with pytest.raises(ValueError, match="HiStream Loader, input 'attention': attention backend sage cannot run .*sdpa"):
        nodes()["HiStreamLoader"]().load(checkpoint, "default", "fp32", "sage", "cpu")


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("kwargs, message", [
    (dict(tile_size=256, tile_overlap=256), "input 'tile_overlap': 256 is more than half of tile_size 256: .* use at "
                                            "most 128"),
    (dict(tile_size=512, tile_overlap=480), "input 'tile_overlap': 480 is more than half of tile_size 512"),
    (dict(tile_size=8, tile_overlap=0), "input 'tile_size': 8 is not a tile size: use 0 .* at least 64 px"),
    (dict(tile_size=100), "input 'tile_size': 100 is not a tile size"),
    (dict(tile_size=256, tile_overlap=20), "input 'tile_overlap': 20 is not a multiple of 8 .* use 16 or 24"),
    (dict(save_mp4=True, filename_prefix="  "), "input 'filename_prefix': empty"),
    (dict(save_mp4=True, filename_prefix="../../elsewhere/video"),
     "input 'filename_prefix': '../../elsewhere/video' cannot name a file in the output folder \\(Saving image "
     "outside the output folder is not allowed.\\)"),
    (dict(save_mp4=True, fps=float("nan")), "input 'fps': fps must be between 1 and 240"),  # NaN passes the widget
    (dict(save_mp4=True, crf=99), "input 'crf': crf for .mp4 must be a whole number in \\[0, 51\\]"),
    (dict(save_mp4=True, filename_prefix="HiStream/a\0b"), "input 'filename_prefix': it holds a NUL character"),
    (dict(vae="not a vae"), "input 'vae': expected a ComfyUI VAE"),
    (dict(samples=torch.zeros(1, 16, 8, 8)), "input 'samples': expected Wan video latents"),
    (dict(samples=torch.full((1, 16, 1, 8, 8), float("inf"))), "input 'samples': the latents hold NaN or inf"),
])
def test_decode_bad_inputs(comfy_host, stock_vae, kwargs, message):
    samples = kwargs.pop("samples", torch.zeros(1, 16, 1, 8, 8))
    vae = kwargs.pop("vae", stock_vae)
    with pytest.raises(ValueError, match=f"VAE Chunk Decode, {message}"):
        decode(samples, vae, **kwargs)


class SDVAE(torch.nn.Module):
    """The names ComfyUI's 2D (SD/SDXL/Flux) VAEs share with diffusers' layout, at 2D shapes."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.conv_in = torch.nn.Conv2d(3, 8, 3)
        self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)


class OtherModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


@pytest.mark.parametrize("model, message", [
    (SDVAE(), "diffusers layout, but not a Wan2.1 VAE \\(its encoder's input conv has weights of shape "
              "\\(8, 3, 3, 3\\)"),
    (OtherModel(), "not a Wan2.1 VAE: none of the layouts tried matched"),
])
def test_decode_refuses_a_vae_that_is_not_wan21(comfy_host, model, message):
    """The VAE a workflow already has (SD, SDXL, Flux) is the likeliest wrong wire: an error on the node's input."""
    with pytest.raises(ValueError, match=f"(?s)VAE Chunk Decode, input 'vae': the 'vae' input: {message}.*"
                                         "load wan_2.1_vae.safetensors with Load VAE"):
        decode(torch.zeros(1, 16, 1, 8, 8), StockVAE(model))
    assert comfy_host.progress == []


def test_decode_to_mp4_refuses_a_batch_and_a_missing_ffmpeg(comfy_host, stock_vae, monkeypatch):
    with pytest.raises(ValueError, match="input 'save_mp4': an mp4 holds one video, the latents hold 2"):
        decode(torch.zeros(2, 16, 1, 8, 8), stock_vae, save_mp4=True)
    images = decode(torch.zeros(2, 16, 1, 8, 8), stock_vae)["result"][0]  # without save_mp4 a batch decodes
    assert images.shape == (2, 64, 64, 3)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", "/nowhere/ffmpeg")
    with pytest.raises(ValueError, match="input 'save_mp4': cannot run ffmpeg at /nowhere/ffmpeg \\(set by "
                                         "IMAGEIO_FFMPEG_EXE\\)"):
        decode(torch.zeros(1, 16, 1, 8, 8), stock_vae, save_mp4=True)

    def not_installed():
        raise ImportError("No module named 'imageio_ffmpeg'")

    monkeypatch.setattr(pack_module("nodes.decode"), "ffmpeg_exe", not_installed)
    with pytest.raises(ValueError, match="input 'save_mp4': writing mp4 needs the imageio-ffmpeg package"):
        decode(torch.zeros(1, 16, 1, 8, 8), stock_vae, save_mp4=True)
    assert files_under(comfy_host.output) == []


def test_window_node(comfy_host):
    window = nodes()["HiStreamAnchorWindow"]().build(False, 4, 0, 0, "window")[0]
    assert (window.stream.chunk_frames, window.stream.window, window.rope_positions) == (4, False, "window")
    with pytest.raises(ValueError, match="Anchor Window Cache, input 'local_frames'"):
        nodes()["HiStreamAnchorWindow"]().build(True, 3, 0, 0, "absolute")
    assert not window.kv_cache_fp8
    fp8 = nodes()["HiStreamAnchorWindow"]().build(True, 3, 1, 2, "absolute", kv_cache_dtype="fp8_e4m3fn")[0]
    assert pack_module("nodes.sampler").build_config("histream+", fp8).kv_cache_fp8


def test_window_node_refuses_an_unknown_cache_dtype(comfy_host):
    """ComfyUI checks combo values first; a workflow sent through the API may not."""
    with pytest.raises(ValueError, match="Anchor Window Cache, input 'kv_cache_dtype': 'fp4'"):
        nodes()["HiStreamAnchorWindow"]().build(True, 3, 1, 2, "absolute", kv_cache_dtype="fp4")


def test_window_node_settings_reach_the_sampler_config(comfy_host):
    """Every choice of Anchor Window Cache is the sampler's: the window, the RoPE position policy and the cache dtype."""
    window = nodes()["HiStreamAnchorWindow"]().build(True, 4, 2, 3, "window", kv_cache_dtype="fp8_e4m3fn")[0]
    cfg = pack_module("nodes.sampler").build_config("histream", window)
    assert (cfg.stream.chunk_frames, cfg.stream.anchor_frames, cfg.stream.local_frames) == (4, 2, 3)
    assert cfg.rope_positions == "window" and cfg.kv_cache_fp8


def test_a_window_node_against_the_mode_is_said_in_the_node_text(comfy_host, loaded):
    """The window node wins over the mode, and the artist is told when it turns a mode's ablation row into another."""
    build = nodes()["HiStreamAnchorWindow"]().build
    on, off = build(True, 3, 1, 2, "absolute")[0], build(False, 3, 1, 2, "absolute")[0]
    notes = sample(loaded, mode="self-forcing", window=on, length=1)["ui"]["text"]
    assert any("turns the sliding window on: mode 'self-forcing' keeps every past frame" in n for n in notes)
    notes = sample(loaded, mode="histream", window=off, length=1)["ui"]["text"]
    assert any("turns the sliding window off (full cache, the paper's w/o AGSW)" in n for n in notes)
    assert len(sample(loaded, mode="histream", window=on, length=1)["ui"]["text"]) == 1  # agrees: the summary alone


def test_overrides_change_only_their_knob(comfy_host):
    build = pack_module("nodes.sampler").build_config
    modes = pack_module("histream_core.modes")
    assert build("histream+") == modes.mode_config("histream+")
    cfg = build("histream", shift=5.0, ntk_factor_high=4.0, first_chunk_attn_coef=1.0, later_chunk_steps="1000|500")
    assert cfg.shift == 5.0 and cfg.hd.rope_factors_high == (1.0, 4.0, 4.0) and cfg.hd.first_chunk_attn_coef == 1.0
    assert cfg.later_chunks == modes.mode_config("histream+").later_chunks
    assert cfg.hd.rope_factors_low == modes.mode_config("histream").hd.rope_factors_low


def test_cost_readout_matches_the_flop_count(comfy_host):
    out = nodes()["HiStreamCostReadout"]().report("histream+", 1920, 1088, 81, "wan2.1-1.3b", 798.0)
    text = out["result"][0]
    flops = pack_module("histream_core.flops").run_flops(
        pack_module("histream_core.config").MODEL_PRESETS["wan2.1-1.3b"],
        pack_module("histream_core.modes").mode_config("histream+"), 1920, 1088, 81)
    assert f"model calls: {flops.model_calls} in 7 chunks" in text
    assert f"{flops.tflop_total:,.0f} TFLOP total" in text and out["ui"]["text"] == [text]
    # The design's hand count, 53.3, counts the last chunk's cache passes, which nothing reads (3.9 TFLOP/frame)
    assert math.isclose(flops.tflop_per_frame, 53.3 - 3.9, rel_tol=0.02)
    assert f"{1000 * flops.tflop_per_frame / 798:,.1f} ms/frame" in text
    small = nodes()["HiStreamCostReadout"]().report("histream+", 64, 64, 9, "wan2.1-1.3b", 798.0)["result"][0]
    assert "GFLOP total" in small and "us/frame" in small and " 0 TFLOP" not in small  # it read 0 TFLOP, 0.0 ms


# -- prompt schedule ----------------------------------------------------------------------------------------------------
def test_prompt_schedule_switches_prompt_with_a_recache(comfy_host, loaded):
    schedule = nodes()["HiStreamPromptSchedule"]().build(True, True, positive_2=wan_conditioning(12, seed=5),
                                                          start_frame_2=13)[0]
    out = sample(loaded, length=25, prompt_schedule=schedule)  # 7 latent frames: chunks at latent 0, 3, 6
    kinds = [e["kind"] for name, e in comfy_host.events if name == "histream.progress"]
    assert kinds.count("recache_high") == 2 and kinds.count("recache_low") == 2  # runs [0] and [4, 5] at chunk 3
    plain = sample(loaded, length=25)
    samples, reference = out["result"][0]["samples"], plain["result"][0]["samples"]
    assert torch.equal(samples[:, :, :6], reference[:, :, :6]) and not torch.allclose(samples[:, :, 6:],
                                                                                       reference[:, :, 6:])


def test_prompt_schedule_bad_inputs(comfy_host, loaded):
    node = nodes()["HiStreamPromptSchedule"]()
    with pytest.raises(ValueError, match="input 'positive_2'.*connect at least one"):
        node.build(True, True)
    with pytest.raises(ValueError, match="input 'start_frame_3': 20 is not after start_frame_2 \\(40\\)"):
        node.build(True, True, positive_2=wan_conditioning(4), start_frame_2=40,
                   positive_3=wan_conditioning(4), start_frame_3=20)
    with pytest.raises(ValueError, match="input 'start_frame_4': 40 is not after start_frame_2 \\(40\\)"):
        node.build(True, True, positive_2=wan_conditioning(4), start_frame_2=40,
                   positive_4=wan_conditioning(4), start_frame_4=40)
    clash = node.build(True, True, positive_2=wan_conditioning(4), start_frame_2=46,
                       positive_3=wan_conditioning(4), start_frame_3=47)[0]
    with pytest.raises(ValueError, match="Sampler, input 'prompt_schedule': start_frame_2 and start_frame_3 of "
                                         "HiStream Prompt Schedule both fall in chunk 6: start the later one at frame "
                                         "58 or later"):
        sample(loaded, length=81, prompt_schedule=clash)
    with pytest.raises(ValueError, match="both fall in chunk 6: this video has no later chunk for it: raise length"):
        sample(loaded, length=69, prompt_schedule=clash)  # 6 chunks: frame 58 would be past the end
    clip_l = node.build(True, True, positive_2=wan_conditioning(4), start_frame_2=13,
                        positive_3=wan_conditioning(4, width=768), start_frame_3=25)[0]
    with pytest.raises(ValueError, match="HiStream Prompt Schedule, input 'positive_3': .* CLIP-L"):
        sample(loaded, length=37, prompt_schedule=clip_l)  # the schedule's input is named, not the sampler's
    late = node.build(True, True, positive_2=wan_conditioning(4), start_frame_2=500)[0]
    notes = sample(loaded, length=13, prompt_schedule=late)["ui"]["text"]
    assert any("positive_2 (start_frame_2, chunk 43) starts after this 13-frame video's last chunk (frame 9) and is "
               "unused: lower start_frame_2" in note for note in notes)


def test_cost_readout_predicts_memory_on_request(comfy_host):
    readout = nodes()["HiStreamCostReadout"]()
    plain = readout.report("histream+", 128, 96, 17, "wan2.1-1.3b", 798.0)["result"][0]
    assert "memory" not in plain
    text = readout.report("histream+", 128, 96, 17, "wan2.1-1.3b", 798.0, predict_memory=True,
                          decode_tile_size=64)["result"][0]
    line = text.splitlines()[-1]
    assert line.startswith("predicted peak GPU memory (bfloat16") and "VAE decode (tiles 64)" in line
    sampler_gib = float(line.split("sampler ")[1].split(" GiB")[0])
    assert 2.6 < sampler_gib < 5  # 2.64 GiB of 1.3B bf16 weights, small caches at 128x96
    with pytest.raises(ValueError, match="HiStream Cost Readout, input 'tflops': nan is not a matmul rate"):
        readout.report("histream+", 128, 96, 17, "wan2.1-1.3b", float("nan"))  # NaN passes the widget's minimum
    with pytest.raises(ValueError, match="HiStream Cost Readout, input 'decode_tile_size': 20 is not a tile size"):
        readout.report("histream+", 128, 96, 17, "wan2.1-1.3b", 798.0, predict_memory=True, decode_tile_size=20)


FAKE_PREDICTION = SimpleNamespace(denoise_peak=0, vae_weights=0, decode_peak=0, dit_weights=0)


@needs_fp8_matmul
def test_loader_fp8_fast_multiplies_in_fp8_and_the_sampler_runs(comfy_host, checkpoint, monkeypatch):
    fast = nodes()["HiStreamLoader"]().load(checkpoint, "fp8_e4m3fn_fast", "bf16", "sdpa", "cpu")[0]
    assert fast.model.uses_fp8_matmul
    assert fast.model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    latent = sample(fast)["result"][0]["samples"]
    assert torch.isfinite(latent).all()
    # the Cost Readout predicts memory for the model as loaded: block weights in fp8
    asked = []
    readout = pack_module("nodes.readout")
    monkeypatch.setattr(readout, "predict_memory",
                        lambda *a, **k: asked.append((k["fp8_weights"], k["fp8_matmul"])) or FAKE_PREDICTION)
    stored = nodes()["HiStreamLoader"]().load(checkpoint, "fp8_e4m3fn", "bf16", "sdpa", "cpu")[0]
    for model in (fast, stored):
        readout.HiStreamCostReadout().report("histream+", 64, 64, 9, "wan2.1-1.3b", 798.0, histream_model=model,
                                             predict_memory=True)
    assert asked == [(True, True), (True, False)]


def test_loader_fp8_fast_needs_bf16_and_says_so_before_reading_the_checkpoint(comfy_host, checkpoint, monkeypatch):
    loader = pack_module("nodes.loader")
    monkeypatch.setattr(loader, "load_wan_model", lambda *a, **k: pytest.fail("the checkpoint was read first"))
    with pytest.raises(ValueError, match="HiStream Loader, input 'weight_dtype': fp8_e4m3fn_fast multiplies bf16 "
                                         "activations in fp8, and compute_dtype is fp32: set compute_dtype to bf16"):
        nodes()["HiStreamLoader"]().load(checkpoint, "fp8_e4m3fn_fast", "fp32", "sdpa", "cpu")

    def no_fp8_tensor_cores(device):
        raise ValueError(f"fp8 matmul does not run on {device}")

    monkeypatch.setattr(loader, "check_fp8_matmul", no_fp8_tensor_cores)
    with pytest.raises(ValueError, match="input 'weight_dtype': fp8_e4m3fn_fast: fp8 matmul does not run on cpu"):
        nodes()["HiStreamLoader"]().load(checkpoint, "fp8_e4m3fn_fast", "bf16", "sdpa", "cpu")


def test_loader_dtypes_reach_the_model(comfy_host, checkpoint):
    """weight_dtype is the blocks' storage (fp8: a scale per output channel, the embeddings and head kept as stored)
    and compute_dtype the model's compute dtype."""
    load = nodes()["HiStreamLoader"]().load
    for weight_dtype, stored in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("default", torch.float32)):
        model = load(checkpoint, weight_dtype, "fp32", "sdpa", "cpu")[0].model
        assert model.blocks[0].self_attn.q.weight.dtype == stored and model.head.head.weight.dtype == stored
    fp8 = load(checkpoint, "fp8_e4m3fn", "bf16", "sdpa", "cpu")[0].model
    assert fp8.compute_dtype == torch.bfloat16 and fp8.stores_block_weights_in_fp8 and not fp8.uses_fp8_matmul
    assert fp8.blocks[0].ffn[0].weight_scale.shape == (fp8.blocks[0].ffn[0].weight.shape[0], 1)
    assert fp8.patch_embedding.weight.dtype == fp8.head.head.weight.dtype == torch.float32


def test_loader_compile_on_the_cpu_runs_eagerly_and_says_so(comfy_host, checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        model = nodes()["HiStreamLoader"]().load(checkpoint, "default", "fp32", "sdpa", "cpu", compile=True)[0]
    assert "compile is for CUDA GPUs; running cpu eagerly" in caplog.text
    assert "_compiled_blocks" not in vars(model.model)  # eager: no graphs to build on a CPU


@pytest.mark.parametrize("kv_recache, recache_anchor, recache_calls", [(True, True, 2), (True, False, 1),
                                                                        (False, True, 0)])
def test_prompt_schedule_recache_switches_reach_the_sampler(comfy_host, loaded, kv_recache, recache_anchor,
                                                           recache_calls):
    """At the switch (chunk 3) the cached frames are latent 0 (the anchor) and 4-5: the recache re-encodes both
    runs, the local run alone without the anchor, nothing without kv_recache."""
    schedule = nodes()["HiStreamPromptSchedule"]().build(kv_recache, recache_anchor, start_frame_2=13,
                                                          positive_2=wan_conditioning(12, seed=5))[0]
    sample(loaded, length=25, prompt_schedule=schedule)
    kinds = [e["kind"] for name, e in comfy_host.events if name == "histream.progress"]
    assert kinds.count("recache_high") == kinds.count("recache_low") == recache_calls


def test_cost_readout_predicts_memory_in_the_models_compute_dtype(comfy_host, loaded):
    """A connected model computing in fp32 is predicted in fp32 (twice bf16's activations), not in bf16."""
    text = nodes()["HiStreamCostReadout"]().report("histream+", 64, 64, 9, "wan2.1-1.3b", 798.0, histream_model=loaded,
                                                   predict_memory=True)["result"][0]
    assert text.splitlines()[-1].startswith("predicted peak GPU memory (float32")


def test_decode_to_mp4_takes_its_fps_and_crf(comfy_host, stock_vae):
    """fps is the mp4's frame rate; crf its quality: crf 0 keeps far more bytes than crf 51."""
    latents = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    paths = [decode(latents, stock_vae, save_mp4=True, fps=24.0, crf=crf)["result"][1] for crf in (0, 51)]
    assert next(imageio_ffmpeg.read_frames(paths[0]))["fps"] == 24
    sizes = [os.path.getsize(path) for path in paths]
    assert sizes[0] > 4 * sizes[1], sizes  # measured: 29.7 vs 1.8 kB


def test_loader_fp8_fast_refuses_fp16_compute_too_before_reading_the_checkpoint(comfy_host, checkpoint, monkeypatch):
    """fp8_e4m3fn_fast multiplies bf16 activations only: fp16 is refused as fp32 is, before the checkpoint is read
    (the model's own check would come after minutes of loading, without naming the node's input)."""
    loader = pack_module("nodes.loader")
    monkeypatch.setattr(loader, "load_wan_model", lambda *a, **k: pytest.fail("the checkpoint was read first"))
    with pytest.raises(ValueError, match="HiStream Loader, input 'weight_dtype': fp8_e4m3fn_fast multiplies bf16 "
                                         "activations in fp8, and compute_dtype is fp16: set compute_dtype to bf16"):
        nodes()["HiStreamLoader"]().load(checkpoint, "fp8_e4m3fn_fast", "fp16", "sdpa", "cpu")
