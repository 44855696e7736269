"""KVCache bookkeeping and RoPE re-indexing of cached keys."""

import pytest
import torch

from conftest import tiny_model
from histream_core.cache import KVCache, dequantize_fp8, quantize_fp8
from histream_core.model.rope import shift_time


def kv(frames, tokens=4, value=0.0):
    t = torch.full((1, frames * tokens, 2, 6), value)
    return t, t.clone()


def test_write_appends_overwrites_and_windows():
    cache = KVCache(num_layers=2)
    cache.write([kv(3, value=1.0)] * 2, [0, 1, 2], tokens_per_frame=4)
    cache.write([kv(3, value=2.0)] * 2, [3, 4, 5], tokens_per_frame=4)
    assert cache.positions == [0, 1, 2, 3, 4, 5] and cache.num_tokens == 24
    cache.write([kv(1, value=9.0)] * 2, [1], tokens_per_frame=4)  # rewrite one frame at its position
    assert cache.keys[0][0, 4:8].unique().tolist() == [9.0]
    cache.slide_window(anchor_frames=1, local_frames=2)
    assert cache.positions == [0, 4, 5]
    assert cache.keys[1][0, :4].unique().tolist() == [1.0] and cache.keys[1][0, 4:].unique().tolist() == [2.0]


def test_keeping_frames_the_cache_does_not_hold_is_refused():
    cache = KVCache(num_layers=1)
    with pytest.raises(IndexError, match=r"cannot keep frames \[0\]: the cache holds 0"):
        cache.keep([0])
    cache.write([kv(2)], [0, 1], tokens_per_frame=4)
    cache.keep([1])
    assert cache.positions == [1] and cache.keys[0].shape[1] == 4


def test_one_cache_per_resolution():
    cache = KVCache(num_layers=1)
    cache.write([kv(1, tokens=4)], [0], tokens_per_frame=4)
    with pytest.raises(ValueError, match="one cache per resolution"):
        cache.write([kv(1, tokens=9)], [1], tokens_per_frame=9)


def test_cache_writes_that_would_corrupt_it_are_refused():
    """K/V for another layer count, a write left half done, or a reposition to other frame counts is a model bug:
    refused, never written into the cache."""
    cache = KVCache(num_layers=2)
    with pytest.raises(ValueError, match="cache has 2 layers but got K/V for 1"):
        cache.write([kv(2)], positions=[0, 1], tokens_per_frame=4)
    write = cache.begin_write([0, 1], tokens_per_frame=4)
    write.layer(0, *kv(2))
    with pytest.raises(ValueError, match=r"left blocks \[1\] without K/V"):
        write.finish()
    cache = KVCache(num_layers=2)
    cache.write([kv(2), kv(2)], positions=[0, 1], tokens_per_frame=4)
    with pytest.raises(ValueError, match="need 2 new positions, got 1"):
        cache.reposition([0], lambda k, d: k)


def test_reindexed_keys_equal_keys_computed_at_the_new_position():
    model = tiny_model(seed=1)
    x = torch.randn(1, 16, 3, 4, 4)
    text = model.encode_text(torch.randn(1, 5, model.cfg.text_dim))
    at_two, at_five = KVCache(2), KVCache(2)
    with torch.no_grad():
        model(x, torch.zeros(1), text, cache=at_two, frame_start=2, update_cache=True)
        model(x, torch.zeros(1), text, cache=at_five, frame_start=5, update_cache=True)
    at_two.reposition([5, 6, 7], lambda k, d: shift_time(k, d, model.cfg.rope_split))
    assert at_two.positions == at_five.positions
    for moved, direct in zip(at_two.keys, at_five.keys):
        torch.testing.assert_close(moved, direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(at_two.values[0], at_five.values[0])


def test_write_cache_writes_what_a_full_cache_pass_writes():
    """write_cache skips the last block's attention, FFN and the head; the K/V it writes (over a cache that already
    holds a chunk, with a window) are those of forward(update_cache=True), bit for bit."""
    model = tiny_model(seed=1)
    text = model.encode_text(torch.randn(1, 5, model.cfg.text_dim))
    chunks = [torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    full, written = KVCache(2), KVCache(2)
    for cache in (full, written):
        cache.window = (1, 2)
    with torch.no_grad():
        for index, x in enumerate(chunks):
            model(x, torch.zeros(1), text, cache=full, frame_start=3 * index, update_cache=True)
            assert model.write_cache(x, torch.zeros(1), text, cache=written, frame_start=3 * index) is None
    assert full.positions == written.positions == [0, 7, 8]
    for a, b in zip(full.keys + full.values, written.keys + written.values):
        assert torch.equal(a, b)


def test_chunked_forward_is_differentiable_for_training():
    """DMD-style training runs the same chunk-wise rollout with gradients on: cache writes are detached, the math
    is not inference-only."""
    model = tiny_model(seed=2).train()
    text = model.encode_text(torch.randn(1, 5, model.cfg.text_dim))
    cache = KVCache(2)
    model(torch.randn(1, 16, 3, 4, 4), torch.zeros(1), text, cache=cache, frame_start=0, update_cache=True)
    assert all(not k.requires_grad for k in cache.keys)
    v = model(torch.randn(1, 16, 3, 4, 4), torch.tensor([700.0]), text, cache=cache, frame_start=3)
    v.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for name, g in grads.items()), \
        [name for name, g in grads.items() if g is None or g.abs().sum() == 0]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_quantization_error_and_edge_cases():
    t = torch.randn(1, 64, 2, 128, generator=torch.Generator().manual_seed(0)) * 30
    t[0, 0] = 0.0  # an all-zero token must not divide by zero
    values, scale = quantize_fp8(t)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (1, 64, 2, 1)
    back = dequantize_fp8(values, scale)
    assert torch.isfinite(back).all() and torch.equal(back[0, 0], t[0, 0])
    assert _relative_error(back, t) < 0.03  # 3 mantissa bits: ~2.6% rms on Gaussian data
    assert back.abs().amax(-1).sub(t.abs().amax(-1)).abs().max() < 1e-3 * t.abs().max()  # the absmax is kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp8_quantization_of_zero_and_tiny_rows_in_every_compute_dtype(dtype):
    """fp16's range ends near 6e-8: a scale floor below it underflowed to 0 and an all-zero row came back NaN."""
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-6, -2e-6, 0.0, 0.0], [3e-3, -1e-3, 0.0, 2e-3]], dtype=dtype)
    back = dequantize_fp8(*quantize_fp8(t))
    assert torch.isfinite(back).all() and torch.equal(back[0], t[0])
    assert (back - t).abs().max() <= 0.07 * t.abs().max()  # e4m3 keeps ~6% per value at worst


def test_fp8_cache_follows_the_full_precision_cache():
    """Same writes, windows and RoPE re-indexing on an fp8 and a full-precision cache: same bookkeeping, half the
    bytes per cached value, and reads within the quantization error."""
    model = tiny_model(seed=1)
    text = model.encode_text(torch.randn(1, 5, model.cfg.text_dim))
    plain, fp8 = KVCache(2), KVCache(2, fp8=True)
    with torch.no_grad():
        for cache in (plain, fp8):
            for start in (0, 3, 6):
                x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(start))
                model(x, torch.zeros(1), text, cache=cache, frame_start=start, update_cache=True)
            cache.slide_window(anchor_frames=1, local_frames=2)
            cache.reposition([0, 1, 2], lambda k, d: shift_time(k, d, model.cfg.rope_split))
    assert fp8.positions == plain.positions == [0, 1, 2] and fp8.num_tokens == plain.num_tokens
    assert fp8.keys[0].dtype == torch.float8_e4m3fn and fp8.keys[0].element_size() * 4 == plain.keys[0].element_size()
    for index in range(2):
        for got, want in zip(fp8.layer(index), plain.layer(index)):
            assert got.dtype == want.dtype and _relative_error(got, want) < 0.04


def test_a_windowed_cache_drops_frames_as_it_writes():
    """Writing into a cache with a window gives what writing everything and then sliding the window gives, without
    ever holding the frames the window drops (a 1080p cache pass once held twice the window)."""
    windowed, plain = KVCache(num_layers=2, window=(1, 2)), KVCache(num_layers=2)
    for start in (0, 3, 6, 9):
        new = [(torch.randn(1, 3 * 4, 2, 6), torch.randn(1, 3 * 4, 2, 6)) for _ in range(2)]
        pending = windowed.begin_write([start, start + 1, start + 2], tokens_per_frame=4)
        for index, (k, v) in enumerate(new):
            pending.layer(index, k, v)
            assert windowed.keys[index].shape[1] <= 3 * 4  # never more than anchor + local frames
        pending.finish()
        plain.write(new, [start, start + 1, start + 2], tokens_per_frame=4)
        plain.slide_window(anchor_frames=1, local_frames=2)
        assert windowed.positions == plain.positions == [0, start + 1, start + 2]
        for got, want in zip(windowed.keys + windowed.values, plain.keys + plain.values):
            assert torch.equal(got, want)


def test_ntk_factors_turn_each_axis_by_the_formula():
    """NTK RoPE: axis a's base is rope_theta * factor_a, so the keys written with factors F are the plain keys turned
    by pos_a * ((theta * F_a) ** (-2j / d_a) - theta ** (-2j / d_a)) on pair j of axis a. Distinct factors per axis
    catch a factor given to the wrong axis (and factors that never reach the RoPE)."""
    from histream_core.model import AttentionSettings
    model = tiny_model(seed=1)
    frames, rows, cols, start = 2, 2, 3, 4  # latent 2 x 4 x 6 -> tokens (2, 2, 3), at temporal positions 4, 5
    x = torch.randn(1, 16, frames, 2 * rows, 2 * cols, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(torch.randn(1, 5, model.cfg.text_dim))
    factors = (2.0, 3.0, 5.0)
    plain, scaled = KVCache(2), KVCache(2)
    with torch.no_grad():
        model(x, torch.zeros(1), text, cache=plain, frame_start=start, update_cache=True)
        model(x, torch.zeros(1), text, cache=scaled, frame_start=start, update_cache=True,
              settings=AttentionSettings(rope_factors=factors))
    f, y, c = torch.meshgrid(torch.arange(frames) + start, torch.arange(rows), torch.arange(cols), indexing="ij")
    turn = []
    for pos, d, factor in zip((f, y, c), model.cfg.rope_split, factors):  # Wan: 8 / 8 / 8 channels here
        j = torch.arange(d // 2, dtype=torch.float64)
        omega = lambda theta: theta ** (-2 * j / d)  # noqa: E731
        turn.append(pos.flatten()[:, None].double() * (omega(10000.0 * factor) - omega(10000.0)))
    rotation = torch.polar(torch.ones(1), torch.cat(turn, dim=1).float())[None, :, None, :]  # [1, L, 1, head_dim/2]
    # the first block's keys come from the same input (later blocks' inputs depend on the RoPE through attention)
    k_plain = torch.view_as_complex(plain.keys[0].unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(k_plain * rotation).flatten(-2)
    torch.testing.assert_close(scaled.keys[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain.keys[0], scaled.keys[0], atol=1e-3)
    assert torch.equal(plain.values[0], scaled.values[0])


def test_logit_scale_multiplies_the_self_attention_logits():
    """HD inference's attention scaling multiplies the softmax logits of self-attention, the cached keys included:
    the same as scaling every query (here through norm_q's gain) and leaving the scale at 1, for a cache pass and for
    a call over that cache. Cross-attention is not scaled."""
    import math
    from histream_core.model import AttentionSettings
    scale = math.log(2040 * 2) / math.log(2040)  # chunk 1's coefficient at the paper's settings
    model, reference = tiny_model(seed=4), tiny_model(seed=4)
    with torch.no_grad():
        for block in reference.blocks:
            block.self_attn.norm_q.weight.mul_(scale)
    gen = torch.Generator().manual_seed(0)
    prefix, x = torch.randn(1, 16, 3, 4, 4, generator=gen), torch.randn(1, 16, 3, 4, 4, generator=gen)
    text = torch.randn(1, 5, model.cfg.text_dim, generator=gen)
    outputs = []
    with torch.no_grad():
        for m, settings in ((model, AttentionSettings(logit_scale=scale)), (reference, AttentionSettings()),
                            (model, AttentionSettings())):
            cache = KVCache(2)
            m(prefix, torch.zeros(1), text, cache=cache, update_cache=True, settings=settings)
            outputs.append(m(x, torch.tensor([700.0]), text, cache=cache, frame_start=3, settings=settings))
    scaled, queries_scaled, unscaled = outputs
    torch.testing.assert_close(scaled, queries_scaled, atol=1e-5, rtol=1e-5)
    assert (scaled - unscaled).abs().max() > 1e-2


def test_an_anchor_longer_than_the_frames_held_keeps_what_there_is():
    """anchor_frames may exceed the frames written so far (the node allows up to 21): the window keeps the first
    anchor_frames and the last local_frames of what the cache holds, never indices past its end."""
    cache = KVCache(num_layers=1, window=(4, 2))
    held = []
    for start in (0, 3, 6):
        cache.write([kv(3, value=float(start))], [start, start + 1, start + 2], tokens_per_frame=4)
        held.append(list(cache.positions))
    assert held == [[0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 7, 8]]
    assert cache.keys[0].shape[1] == 6 * 4


def test_keeping_a_negative_index_is_refused():
    """keep() takes indices into ``positions``: -1 is refused by keep's own check, with its message, before the
    cache is touched (past the check, index_select fails with a bare RuntimeError, which the CLI reports as a bug)."""
    cache = KVCache(num_layers=1)
    cache.write([kv(2)], [0, 1], tokens_per_frame=4)
    with pytest.raises(IndexError, match=r"cannot keep frames \[-1\]: the cache holds 2"):
        cache.keep([-1])
    assert cache.positions == [0, 1] and cache.keys[0].shape[1] == 8
