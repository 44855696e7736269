"""The TAEHV-class tiny decoder: streaming equals whole, causality, frame counts, loading taew2_1-layout files.

(Its parity with madebyollin's reference TAEHV was checked by hand on random weights: 3.6e-6 max difference, in
parallel and sequential mode; that code is not a dependency of this project, so the check is not repeated here.)
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from histream_core.vae.tiny import TimeGrow, TinyWanDecoder, load_tiny_decoder


def random_decoder(seed: int = 0) -> TinyWanDecoder:
    decoder = TinyWanDecoder().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return decoder


@pytest.fixture(scope="module")
def decoder() -> TinyWanDecoder:
    return random_decoder()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 16, 5, 6, 8, generator=torch.Generator().manual_seed(1))


def test_frames_count_range_and_streaming(decoder: TinyWanDecoder, latents: torch.Tensor) -> None:
    whole = decoder.decode(latents)
    assert whole.shape == (1, 3, 1 + 4 * 4, 48, 64) and whole.min() >= -1 and whole.max() <= 1
    pieces = [latents[:, :, :1], latents[:, :, 1:3], latents[:, :, 3:]]
    streamed = list(decoder.decode_stream(iter(pieces)))
    assert [f.shape[2] for f in streamed] == [1, 8, 8]
    # float noise is ~6e-6; a stream that loses its memory is off by ~0.1
    torch.testing.assert_close(torch.cat(streamed, dim=2), whole, atol=1e-4, rtol=1e-4)


def test_causal(decoder: TinyWanDecoder, latents: torch.Tensor) -> None:
    changed = latents.clone()
    changed[:, :, 3:] = torch.randn_like(changed[:, :, 3:])
    first, second = decoder.decode(latents), decoder.decode(changed)
    frames_before = 1 + 4 * 2  # from latent frames 0-2
    torch.testing.assert_close(first[:, :, :frames_before], second[:, :, :frames_before])
    assert not torch.allclose(first[:, :, frames_before:], second[:, :, frames_before:])


def test_time_grow_makes_consecutive_frames() -> None:
    grow = TimeGrow(2, stride=2)
    with torch.no_grad():
        grow.conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]).reshape(4, 2, 1, 1))
    frames = torch.stack([torch.full((2, 1, 1), float(t + 1)) for t in range(3)])  # frame t holds t + 1
    out = grow(frames)  # frame t -> (t + 1, 2 (t + 1))
    assert out.flatten().tolist() == [1, 1, 2, 2, 2, 2, 4, 4, 3, 3, 6, 6]


def test_loads_taew2_1_layout_and_explains_bad_files(decoder: TinyWanDecoder, latents: torch.Tensor,
                                                     tmp_path) -> None:
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    state["decoder.7.conv.weight"] = torch.cat([torch.randn_like(state["decoder.7.conv.weight"]),
                                                state["decoder.7.conv.weight"]])  # trained with stride 2
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # the file's encoder is not used
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    loaded = load_tiny_decoder(tmp_path / "taew2_1.safetensors")
    assert torch.equal(loaded.decode(latents), decoder.decode(latents))
    torch.save(decoder.state_dict(), tmp_path / "taew2_1.pth")
    assert torch.equal(load_tiny_decoder(tmp_path / "taew2_1.pth").decode(latents), decoder.decode(latents))

    save_file({"encoder.0.weight": torch.zeros(1)}, str(tmp_path / "encoder_only.safetensors"))
    with pytest.raises(ValueError, match="(?s)no .decoder.. tensors.*taew2_1"):
        load_tiny_decoder(tmp_path / "encoder_only.safetensors")
    state = dict(decoder.state_dict())
    state["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)  # a 48-channel (Wan2.2) TAEHV
    save_file(state, str(tmp_path / "taew2_2.safetensors"))
    with pytest.raises(ValueError, match="(?s)16 latent channels.*decoder.1.weight"):
        load_tiny_decoder(tmp_path / "taew2_2.safetensors")
    with pytest.raises(ValueError, match="taew2_1"):
        load_tiny_decoder(tmp_path / "missing.safetensors")
    from histream_core.vae import WanVAE, WanVAEConfig
    save_file(WanVAE(WanVAEConfig(base_dim=8)).state_dict(), str(tmp_path / "wan_2.1_vae.safetensors"))
    with pytest.raises(ValueError, match="(?s)it is the Wan VAE .*not the tiny decoder.*give it as the VAE "
                                         "\\(CLI: --vae"):
        load_tiny_decoder(tmp_path / "wan_2.1_vae.safetensors")


def test_mem_block_and_soft_clamp_follow_taehv() -> None:
    """Hand-computed against TAEHV's definitions: MemBlock = relu(conv(cat([x, past])) + skip(x)), the current frame
    first (taew2_1's weights are trained so), and the input clamp 3 * tanh(x / 3)."""
    from histream_core.vae.tiny import MemBlock, SoftClamp
    block = MemBlock(1, 1)
    with torch.no_grad():
        for conv in block.conv[::2]:  # centre taps only: no padding effects
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0
            conv.bias.zero_()
        block.conv[0].weight[0, 1, 1, 1] = 10.0  # the past frame's channel
    x, past = torch.full((1, 1, 3, 3), 1.0), torch.full((1, 1, 3, 3), 2.0)
    assert torch.equal(block(x, past), torch.full((1, 1, 3, 3), 1.0 + 10.0 * 2.0 + 1.0))
    torch.testing.assert_close(SoftClamp()(torch.tensor([0.0, 3.0, -30.0])),
                               torch.tensor([0.0, 3 * 0.7615941559557649, -3 * 0.9999999958776927]))


def test_decodes_model_space_latents(decoder: TinyWanDecoder) -> None:
    """TAEHV reads the DiT's normalized latents: raw latents are normalized first. Decoded by hand for one latent
    frame: each MemBlock's past is the previous frame (zeros for the first), and of the 4 frames the last is kept."""
    from histream_core.vae import denormalize
    from histream_core.vae.tiny import MemBlock
    model_space = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(2))
    h = model_space[:, :, 0]
    with torch.no_grad():
        for layer in decoder.decoder:
            h = layer(h, torch.cat([torch.zeros_like(h[:1]), h[:-1]])) if isinstance(layer, MemBlock) else layer(h)
    frames = decoder.decode(denormalize(model_space))
    assert frames.shape == (1, 3, 1, 32, 48)
    torch.testing.assert_close(frames[:, :, 0], h[3:].clamp(0, 1) * 2 - 1, atol=1e-5, rtol=1e-5)


def test_preview_variant_gives_one_small_frame_per_latent_frame(decoder: TinyWanDecoder, latents: torch.Tensor,
                                                                 tmp_path) -> None:
    """The preview decoder: no time upsampling and only the last stage's 2x, so frames at twice the latent size."""
    save_file(decoder.state_dict(), str(tmp_path / "taew2_1.safetensors"))
    preview = load_tiny_decoder(tmp_path / "taew2_1.safetensors", preview=True)
    frames = preview.decode(latents)
    assert frames.shape == (1, 3, 5, 12, 16) and frames.min() >= -1 and frames.max() <= 1
    streamed = torch.cat(list(preview.decode_stream(iter([latents[:, :, :2], latents[:, :, 2:]]))), dim=2)
    torch.testing.assert_close(streamed, frames, atol=1e-5, rtol=1e-5)


def test_the_pipeline_refuses_tiles_with_the_tiny_decoder(decoder: TinyWanDecoder, tmp_path) -> None:
    from conftest import tiny_model
    from histream_core.modes import mode_config
    from histream_core.pipeline import generate_to_file
    with pytest.raises(ValueError, match=r"decode tiles apply to the Wan VAE.*\(leave tile at None\)"):
        generate_to_file(tiny_model(), decoder, torch.zeros(1, 4, 32), tmp_path / "x.mp4", 64, 64, 9,
                         mode_config("histream"), 0, tile=8)
    assert not any(tmp_path.iterdir())


def test_the_wan_vae_in_the_diffusers_layout_is_told_to_go_to_the_vae(tmp_path) -> None:
    """diffusers' AutoencoderKLWan names the decoder's input conv conv_in: named as the Wan VAE too, not as a tiny
    decoder whose tensors do not fit."""
    state = {"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3, 3),
             "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3, 3),
             "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 3)}
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="(?s)it is the Wan VAE .*not the tiny decoder.*give it as the VAE"):
        load_tiny_decoder(tmp_path / "diffusion_pytorch_model.safetensors")
