"""CausalWanModel against diffusers' WanTransformer3DModel on the same random tiny weights.

Bidirectional mode must match a plain diffusers forward; chunk-by-chunk generation over the KV cache must match a
diffusers forward over [clean prefix, noisy chunk] with per-token timesteps [0..0, t] and a block-causal mask.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from histream_core.cache import KVCache

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

ATOL = RTOL = 1e-3


def to_diffusers(model) -> torch.nn.Module:
    cfg = model.cfg
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps)
    converted = convert_wan_transformer_to_diffusers(dict(model.state_dict()))  # consumes its input: pass a copy
    missing, unexpected = ref.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    return ref.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    assert relative_error(ours, ref) < 1e-4


def text(cfg, seed=1):
    return torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed))


class BlockCausalProcessor(WanAttnProcessor):
    """diffusers' Wan attention with a boolean mask on self-attention only."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def block_causal_mask(num_frames: int, chunk: int, tokens_per_frame: int) -> torch.Tensor:
    block = torch.arange(num_frames).div(chunk, rounding_mode="floor").repeat_interleave(tokens_per_frame)
    return block[:, None] >= block[None, :]


@pytest.mark.parametrize("frames,height,width", [(1, 4, 6), (5, 6, 4)])
def test_bidirectional_matches_diffusers(frames, height, width):
    model = tiny_model(seed=3)
    ref = to_diffusers(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, frames, height, width, generator=gen)
    t = torch.tensor([937.5, 250.0])
    context = text(model.cfg).expand(2, -1, -1)
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = ref(x, t, context, return_dict=False)[0]
    assert ours.shape == (2, 16, frames, height, width)
    assert_close(ours, theirs)


def run_chunks(model, clean, noisy, t, context, chunk, bug=None):
    """Cache pass (t=0) over each clean chunk, then one denoising call on the noisy chunk.

    ``bug`` breaks one thing on purpose, to prove the comparison can fail: "rope_offset" rotates every chunk at
    position 0, "cache_timestep" fills the cache at the noisy timestep, "no_cache" forgets the prefix.
    """
    cache = KVCache(model.cfg.num_layers)
    text_kv = model.encode_text(context)
    cache_t = torch.tensor([t if bug == "cache_timestep" else 0.0])
    for start in range(0, clean.shape[2], chunk):
        if bug != "no_cache":
            model(clean[:, :, start:start + chunk], cache_t, text_kv, cache=cache,
                  frame_start=0 if bug == "rope_offset" else start, update_cache=True)
    start = 0 if bug == "rope_offset" else clean.shape[2]
    return model(noisy, torch.tensor([t]), text_kv, cache=cache, frame_start=start), cache


def diffusers_causal(ref, clean, noisy, t, context, chunk):
    video = torch.cat([clean, noisy], dim=2)
    frames, (h, w) = video.shape[2], video.shape[3:]
    tokens_per_frame = (h // 2) * (w // 2)
    ref.set_attn_processor(BlockCausalProcessor(block_causal_mask(frames, chunk, tokens_per_frame)))
    timesteps = torch.cat([torch.zeros(clean.shape[2] * tokens_per_frame),
                           torch.full((noisy.shape[2] * tokens_per_frame,), float(t))])[None]
    out = ref(video, timesteps, context, return_dict=False)[0]
    return out[:, :, clean.shape[2]:]


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_cache_matches_block_causal_diffusers(chunk):
    model = tiny_model(seed=5)
    ref = to_diffusers(model)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(1, 16, 2 * chunk, 4, 6, generator=gen)
    noisy = torch.randn(1, 16, chunk, 4, 6, generator=gen)
    context = text(model.cfg)
    with torch.no_grad():
        ours, cache = run_chunks(model, clean, noisy, 700.0, context, chunk)
        theirs = diffusers_causal(ref, clean, noisy, 700.0, context, chunk)
    assert cache.positions == list(range(2 * chunk))
    assert_close(ours, theirs)


@pytest.mark.parametrize("bug", ["rope_offset", "cache_timestep", "no_cache"])
def test_causal_parity_can_fail(bug):
    """Each deliberate bug must break the parity check by a wide margin (figures in the issue note)."""
    model = tiny_model(seed=5)
    ref = to_diffusers(model)
    gen = torch.Generator().manual_seed(1)
    clean, noisy = torch.randn(1, 16, 3, 4, 6, generator=gen), torch.randn(1, 16, 3, 4, 6, generator=gen)
    context = text(model.cfg)
    with torch.no_grad():
        wrong, _ = run_chunks(model, clean, noisy, 700.0, context, 3, bug=bug)
        theirs = diffusers_causal(ref, clean, noisy, 700.0, context, 3)
    assert relative_error(wrong, theirs) > 1e-2  # 100x the parity bound
    with pytest.raises(AssertionError):
        assert_close(wrong, theirs)
