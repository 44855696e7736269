"""The HiStream loop: invariants of the window and of dual-resolution caching, call counts, determinism, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import tiny_model
from histream_core.cache import DualResCache, KVCache
from histream_core.config import ChunkSteps, HDConfig, ModelConfig, SamplerConfig, StreamConfig
from histream_core.model import AttentionSettings
from histream_core.modes import MODES, mode_config, with_knobs
from histream_core.sampler import (GenerationInterrupted, NonFiniteLatents, RequestError, chunk_at_frame,
                                   generate_video, plan_video, size_step, stream_video, video_geometry)

W, H = 64, 96  # latent 12x8 at high resolution, 6x4 at low


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


@pytest.fixture(scope="module")
def context(model):
    return torch.randn(1, 10, model.cfg.text_dim, generator=torch.Generator().manual_seed(2))


def run(model, context, cfg, frames=37, seed=0, **kwargs):
    with torch.no_grad():
        return generate_video(model, context, W, H, frames, cfg, seed, **kwargs)


def test_window_covering_every_frame_equals_full_cache(model, context):
    full = run(model, context, mode_config("no-agsw"))
    wide_window = mode_config("histream").with_(stream=StreamConfig(anchor_frames=1, local_frames=100))
    assert torch.equal(run(model, context, wide_window), full)


def test_window_changes_the_result_once_frames_are_dropped(model, context):
    assert not torch.equal(run(model, context, mode_config("histream")), run(model, context, mode_config("no-agsw")))


def test_equal_resolutions_make_drc_a_no_op(model, context):
    """Low == high resolution (scale 1, same RoPE factors): DRC equals plain full-res sampling with the same noise."""
    hd = HDConfig(rope_factors_low=(1.0, 5.0, 5.0), rope_factors_high=(1.0, 5.0, 5.0), first_chunk_attn_coef=1.0)
    drc = SamplerConfig(low_res_scale=1.0, hd=hd)
    four = ChunkSteps(low=(), high=(1000.0, 750.0, 500.0, 250.0))
    plain = SamplerConfig(drc=False, hd=hd, first_chunk=four, later_chunks=four)
    assert torch.equal(run(model, context, drc), run(model, context, plain))


@pytest.mark.parametrize("mode,first,later,cache_passes", [
    ("histream", 4 + 2, 4 + 2, 2), ("histream+", 4 + 2, 2 + 2, 2), ("self-forcing", 4 + 1, 4 + 1, 1),
    ("no-drc", 4 + 1, 4 + 1, 1), ("no-agsw", 4 + 2, 4 + 2, 2), ("two-step", 2 + 2, 2 + 2, 2),
    ("no-hd", 4 + 2, 4 + 2, 2)])
def test_model_calls_per_chunk(model, context, mode, first, later, cache_passes):
    kinds_per_chunk: dict[int, list[str]] = {}
    with torch.no_grad():
        chunks = list(stream_video(model, context, W, H, 37, MODES[mode], 0,
                                   on_progress=lambda p: kinds_per_chunk.setdefault(p.chunk, []).append(p.kind)))
    # the last chunk writes no cache: nothing reads it
    assert [c.model_calls for c in chunks] == [first] + [later] * (len(chunks) - 2) + [later - cache_passes]
    assert not any(kind.startswith("cache") for kind in kinds_per_chunk[len(chunks) - 1])
    assert [len(kinds_per_chunk[i]) for i in range(len(chunks))] == [c.model_calls for c in chunks]
    assert kinds_per_chunk[1].count("cache_high") == 1


def hd_calls(context, cfg) -> list[tuple[int, str, tuple, float]]:
    """(chunk, kind, RoPE factors, logit scale) of every model call of a 37-frame video, in order."""
    settings, kinds = [], []

    def spy(method):
        def call(*args, **kwargs):
            settings.append(kwargs["settings"])
            return method(*args, **kwargs)
        return call

    spied = tiny_model(seed=11)
    spied.forward, spied.write_cache = spy(spied.forward), spy(spied.write_cache)
    with torch.no_grad():
        list(stream_video(spied, context, W, H, 37, cfg, 0, on_progress=lambda p: kinds.append((p.chunk, p.kind))))
    return [(chunk, kind, s.rope_factors, s.logit_scale) for (chunk, kind), s in zip(kinds, settings, strict=True)]


def test_absolute_positions_past_training_are_warned_about(model, context, caplog):
    with torch.no_grad():
        list(stream_video(model, context, W, H, 85, mode_config("histream+"), 0))  # 22 latent frames
    assert "22 latent frames at absolute RoPE positions" in caplog.text and "rope_positions 'window'" in caplog.text
    caplog.clear()
    with torch.no_grad():
        list(stream_video(model, context, W, H, 85, mode_config("histream+").with_(rope_positions="window"), 0))
    assert "RoPE" not in caplog.text


def test_hd_tech_reaches_the_calls_the_paper_names(context):
    """Appendix A.2: NTK factor 2 where the tuned model works (low res), 5 at full res; attention scaling 2 on chunk
    1's full-resolution calls only (its cache pass too: later chunks read that K/V), never on later chunks."""
    scaled = math.log(2040 * 2) / math.log(2040)
    for chunk, kind, factors, scale in hd_calls(context, mode_config("histream")):
        high = kind in ("high", "cache_high")
        assert factors == ((1.0, 5.0, 5.0) if high else (1.0, 2.0, 2.0)), (chunk, kind)
        assert scale == (scaled if high and chunk == 0 else 1.0), (chunk, kind)
    no_drc = hd_calls(context, mode_config("no-drc"))
    assert [scale for chunk, _, _, scale in no_drc if chunk == 0] == [scaled] * 5  # 4 steps + the cache pass
    # w/o HD tech undoes the inference-time changes: the tuning's factor 2 everywhere, no scaling
    assert {(factors, scale) for _, _, factors, scale in hd_calls(context, mode_config("no-hd"))} == {
        ((1.0, 2.0, 2.0), 1.0)}
    assert {(f, s) for _, _, f, s in hd_calls(context, mode_config("self-forcing"))} == {((1.0, 1.0, 1.0), 1.0)}


def test_caches_hold_anchor_plus_local_frames_at_their_positions(model, context):
    caches = DualResCache.empty(model.cfg.num_layers)
    cfg = mode_config("histream")
    tokens_high, tokens_low = (12 // 2) * (8 // 2), (6 // 2) * (4 // 2)
    seen = []
    with torch.no_grad():
        for chunk in stream_video(model, context, W, H, 37, cfg, 0, caches=caches):  # 10 latent frames
            seen.append((list(caches.high.positions), list(caches.low.positions)))
            assert caches.high.keys[0].shape[1] == caches.high.num_frames * tokens_high
            assert caches.low.keys[0].shape[1] == caches.low.num_frames * tokens_low
    assert seen == [([0, 1, 2],) * 2, ([0, 4, 5],) * 2, ([0, 7, 8],) * 2, ([0, 7, 8],) * 2]  # last chunk: no write


def test_last_chunk_may_be_shorter(model, context):
    with torch.no_grad():
        chunks = list(stream_video(model, context, W, H, 37, mode_config("histream+"), 0))
    assert [c.latents.shape[2] for c in chunks] == [3, 3, 3, 1]
    assert [c.first_frame for c in chunks] == [0, 3, 6, 9]
    assert chunks[-1].latents.shape == (1, 16, 1, 12, 8)


def test_same_seed_same_video_and_different_seed_different_video(model, context):
    cfg = mode_config("histream")
    a, b = run(model, context, cfg, seed=7), run(model, context, cfg, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(a, run(model, context, cfg, seed=8))


def test_window_rope_policy_keeps_positions_inside_the_window(model, context):
    cfg = mode_config("histream").with_(rope_positions="window")
    caches = DualResCache.empty(model.cfg.num_layers)
    plans = plan_video(video_geometry(W, H, 37, cfg), cfg)
    assert [p.rope_start for p in plans] == [0, 3, 3, 3]
    with torch.no_grad():
        for _ in stream_video(model, context, W, H, 37, cfg, 0, caches=caches):
            assert max(caches.high.positions) <= 5
    absolute = run(model, context, mode_config("histream"))
    windowed = run(model, context, cfg)
    assert torch.equal(absolute[:, :, :6], windowed[:, :, :6])  # chunks 1-2 see identical positions
    assert not torch.equal(absolute[:, :, 6:], windowed[:, :, 6:])


def test_rope_tables_are_reused_within_a_chunk_and_go_with_the_model(context):
    """A chunk's calls share their cos/sin tables; at most 8 are kept, on the model, so unloading it frees them."""
    import gc
    import weakref
    from histream_core.model.rope import rope_angles, rope_cos_sin
    model = tiny_model(seed=3)
    first = model._rope_tables((3, 4, 6), 0, (1.0, 2.0, 2.0), torch.device("cpu"))
    assert model._rope_tables((3, 4, 6), 0, (1.0, 2.0, 2.0), torch.device("cpu")) is first
    expected = rope_cos_sin(rope_angles((3, 4, 6), model.cfg.rope_split, 0, model.cfg.rope_theta, (1.0, 2.0, 2.0),
                                        torch.device("cpu")), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(first, expected))
    for start in range(1, 9):  # 8 newer grids push the first out
        model._rope_tables((3, 4, 6), start, (1.0, 2.0, 2.0), torch.device("cpu"))
    assert model._rope_tables((3, 4, 6), 0, (1.0, 2.0, 2.0), torch.device("cpu")) is not first
    table = weakref.ref(first[0])
    del model, first, expected
    gc.collect()
    assert table() is None


def test_interrupt_stops_between_model_calls(model, context):
    calls = []
    with pytest.raises(GenerationInterrupted, match="chunk 2"):
        with torch.no_grad():
            list(stream_video(model, context, W, H, 37, mode_config("histream"), 0,
                              on_progress=calls.append, should_stop=lambda: len(calls) >= 7))
    assert len(calls) == 7


def test_progress_reports_x0_previews(model, context):
    events = []
    with torch.no_grad():
        list(stream_video(model, context, W, H, 5, mode_config("histream"), 0, on_progress=events.append))
    assert [e.kind for e in events] == ["low", "low", "high", "high"]  # a one-chunk video writes no cache
    assert events[0].x0.shape == (1, 16, 2, 12, 8)[:2] + (2, 6, 4)
    assert events[2].x0.shape == (1, 16, 2, 12, 8)
    assert events[-1].call == events[-1].total_calls == 4
    events.clear()
    with torch.no_grad():
        list(stream_video(model, context, W, H, 13, mode_config("histream"), 0, on_progress=events.append))
    assert [e.kind for e in events][4:6] == ["cache_high", "cache_low"] and events[4].x0 is None


@pytest.mark.parametrize("width,height,frames,cfg,field,match", [
    (1000, 96, 37, "histream", "width", "width 1000 .* use 992 or 1024"),
    (64, 80, 37, "histream", "height", "height 80 .*multiple of 32.* use 64 or 96"),
    (40, 96, 37, "no-drc", "width", "width 40 .*16-pixel tokens.* use 32 or 48"),
    (64, 96, 36, "histream", "frames", "frames must be 4k\\+1.*use 33 or 37"),
    (64, 96, 0, "histream", "frames", "frames must be 4k\\+1"),
    (64.0, 96, 37, "histream", "width", "width must be a whole number, got 64.0 \\(float\\)"),
    (64, "96", 37, "histream", "height", "height must be a whole number"),
    (64, 96, True, "histream", "frames", "frames must be a whole number"),
    (64, 96, 1_000_000_001, "histream", "frames", "frames 1000000001 is above the limit of 100,001"),
    (16_384, 96, 37, "histream", "width", "above the limit of 8,192"),
])
def test_bad_requests_say_what_to_change(model, context, width, height, frames, cfg, field, match):
    with pytest.raises(RequestError, match=match) as error:
        list(stream_video(model, context, width, height, frames, mode_config(cfg), 0))
    assert error.value.field == field


@pytest.mark.parametrize("scale,step", [(0.5, 32), (0.7, 160), (0.55, 320), (0.33, 1600), (1.0, 16)])
def test_the_size_step_is_exact_for_any_low_res_scale(scale, step):
    """Every multiple of the step (and nothing finer) gives whole tokens at both resolutions; floats such as
    1440 * 0.7 = 1007.9999... must not refuse a size that fits."""
    cfg = mode_config("histream").with_(low_res_scale=scale)
    assert size_step(cfg) == step
    geometry = video_geometry(3 * step, step, 1, cfg)
    assert geometry.low == (round(step * scale / 8), round(3 * step * scale / 8))  # rounded, as floats are
    with pytest.raises(RequestError, match=f"{step}(-pixel tokens|\\)); use {step} or {2 * step}"):
        video_geometry(step + 8, step, 1, cfg)


def test_a_prompt_starting_after_the_last_chunk_is_refused(model, context):
    """37 frames are 10 latent frames, 4 chunks of 3 (the last one short): chunk 5 never comes."""
    with pytest.raises(RequestError, match="starts in chunk 5, but this 37-frame video has 4 chunk.*frame 33 or bef"):
        list(stream_video(model, [(0, context), (4, context)], W, H, 37, mode_config("histream"), 0))


def test_non_finite_latents_stop_the_loop(model, context):
    """NaN in (here) the text states would decode to a black video; the loop stops at the first such chunk."""
    with torch.no_grad(), pytest.raises(NonFiniteLatents, match="chunk 1 came out as NaN/inf"):
        list(stream_video(model, torch.full_like(context, float("nan")), W, H, 5, mode_config("histream"), 0))


@pytest.mark.parametrize("make", [lambda: mode_config("histream").with_(shift=float("nan")),
                                  lambda: mode_config("histream").with_(shift=float("inf")),
                                  lambda: HDConfig(first_chunk_attn_coef=float("nan")),
                                  lambda: HDConfig(rope_factors_high=(1.0, float("nan"), 5.0))])
def test_non_finite_settings_are_refused(make):
    with pytest.raises(ValueError, match="positive number"):
        make()


def test_sizes_off_the_32_grid_work_without_drc(model, context):
    with torch.no_grad():
        out = generate_video(model, context, 48, 80, 5, mode_config("no-drc"), 0)
    assert out.shape == (1, 16, 2, 10, 6)


def test_empty_conditioning_is_rejected(model):
    with pytest.raises(ValueError, match="empty"):
        list(stream_video(model, torch.zeros(1, 0, model.cfg.text_dim), W, H, 5, mode_config("histream"), 0))


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match="histream\\+"):
        mode_config("fast")


def test_bad_step_lists_are_rejected():
    with pytest.raises(ValueError, match="decrease"):
        ChunkSteps(low=(500.0,), high=(750.0,))
    with pytest.raises(ValueError, match="drc=True"):
        SamplerConfig(drc=False)


def test_a_batch_of_videos_draws_one_noise_per_video_and_reads_one_prompt_or_one_each(model, context, other_context):
    from histream_core.flops import call_flops
    cfg = mode_config("histream+")
    with torch.no_grad():
        one_prompt = torch.cat([c.latents for c in stream_video(model, context, W, H, 17, cfg, 0, batch=2)], dim=2)
        same_twice = torch.cat([c.latents for c in stream_video(model, context.expand(2, -1, -1), W, H, 17, cfg, 0,
                                                                batch=2)], dim=2)
        second = torch.randn(context.shape, generator=torch.Generator().manual_seed(5))
        two_prompts = torch.cat([c.latents for c in stream_video(model, torch.cat([context, second]), W, H, 17, cfg,
                                                                 0, batch=2)], dim=2)
        with pytest.raises(ValueError, match="text conditioning holds 3 prompts but the video batch is 2"):
            next(stream_video(model, context.expand(3, -1, -1), W, H, 17, cfg, 0, batch=2))
    assert one_prompt.shape == (2, 16, 5, H // 8, W // 8) and torch.isfinite(one_prompt).all()
    assert (one_prompt[0] - one_prompt[1]).abs().max() > 0.1  # each video its own noise
    torch.testing.assert_close(one_prompt, same_twice)  # one prompt is broadcast to the batch
    torch.testing.assert_close(two_prompts[0], one_prompt[0], atol=1e-5, rtol=1e-5)  # video 0 reads prompt 0
    assert (two_prompts[1] - one_prompt[1]).abs().max() > 1e-3  # video 1 reads its own
    geometry = video_geometry(W, H, 17, cfg)
    call = plan_video(geometry, cfg)[1].calls(geometry, cfg.drc)[0]
    assert call_flops(model.cfg, call, batch=2) == 2 * call_flops(model.cfg, call)


# -- prompt schedule and KV recache ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_context(model):
    return torch.randn(1, 6, model.cfg.text_dim, generator=torch.Generator().manual_seed(3))


def test_prompt_switch_recaches_the_window_run_by_run(model, context, other_context):
    kinds: dict[int, list[str]] = {}
    schedule = [(0, context), (2, other_context)]
    with torch.no_grad():
        list(stream_video(model, schedule, W, H, 37, mode_config("histream"), 0,
                          on_progress=lambda p: kinds.setdefault(p.chunk, []).append(p.kind)))
    # chunk 2 starts with cache frames [0, 4, 5]: runs [0] and [4, 5], each at both resolutions
    assert kinds[2][:4] == ["recache_high", "recache_low", "recache_high", "recache_low"]
    assert "recache_high" not in kinds[1] + kinds[3]
    keep_anchor = mode_config("histream").with_(recache_anchor=False)
    kinds.clear()
    with torch.no_grad():
        list(stream_video(model, schedule, W, H, 37, keep_anchor, 0,
                          on_progress=lambda p: kinds.setdefault(p.chunk, []).append(p.kind)))
    assert kinds[2][:2] == ["recache_high", "recache_low"] and kinds[2][2] == "low"


@pytest.mark.parametrize("mode", ["no-drc", "self-forcing"])
def test_prompt_switch_without_drc_recaches_the_high_cache_only(model, context, other_context, mode):
    """Without DRC KV_low is never written: a recache keeping the anchor must not touch it (it crashed)."""
    kinds: dict[int, list[str]] = {}
    cfg = mode_config(mode).with_(recache_anchor=False)
    with torch.no_grad():
        list(stream_video(model, [(0, context), (2, other_context)], W, H, 37, cfg, 0,
                          on_progress=lambda p: kinds.setdefault(p.chunk, []).append(p.kind)))
    assert kinds[2][:2] == ["recache_high", "high"] and "recache_low" not in sum(kinds.values(), [])


def test_recache_runs_stay_eager_even_at_chunk_size(model, context, other_context, monkeypatch):
    """With window positions the recache is one 3-frame run, a full chunk's shape; it still must not ask for a
    compiled graph (one more graph to compile for a call made once per prompt switch)."""
    flags, kinds = [], []  # (latent frames, compiled) of every model call; each call's kind
    run_blocks = model._run_blocks

    def recording(x, timestep, text, cache, frame_start, update_cache, settings, compiled, **kwargs):
        flags.append((x.shape[2], compiled))
        return run_blocks(x, timestep, text, cache, frame_start, update_cache, settings, compiled, **kwargs)

    monkeypatch.setattr(model, "_run_blocks", recording)
    cfg = mode_config("histream").with_(rope_positions="window")
    with torch.no_grad():
        list(stream_video(model, [(0, context), (2, other_context)], W, H, 37, cfg, 0,
                          on_progress=lambda p: kinds.append(p.kind)))
    recache = [compiled for (frames, compiled), kind in zip(flags, kinds) if kind.startswith("recache")]
    assert recache == [False, False] and [f for f, _ in flags][kinds.index("recache_high")] == 3
    assert all(compiled for (frames, compiled), kind in zip(flags, kinds) if kind in ("high", "low") and frames == 3)


def test_recached_kv_equals_encoding_the_window_under_the_new_prompt(model, context, other_context):
    caches = DualResCache.empty(model.cfg.num_layers)
    snapshot = {}

    def grab(progress):
        if progress.chunk == 2 and progress.kind == "low" and not snapshot:
            snapshot["keys"] = [k.clone() for k in caches.high.keys]
            snapshot["positions"] = list(caches.high.positions)

    cfg = mode_config("histream")
    with torch.no_grad():
        video = torch.cat([c.latents for c in stream_video(model, [(0, context), (2, other_context)], W, H, 37, cfg, 0,
                                                           caches=caches, on_progress=grab)], dim=2)
        fresh = KVCache(model.cfg.num_layers)
        text = model.encode_text(other_context)
        settings = AttentionSettings(rope_factors=cfg.hd.rope_factors_high)
        for first, count in ((0, 1), (4, 2)):
            model(video[:, :, first:first + count], torch.zeros(1), text, cache=fresh, frame_start=first,
                  update_cache=True, settings=settings)
    assert snapshot["positions"] == fresh.positions == [0, 4, 5]
    for recached, direct in zip(snapshot["keys"], fresh.keys):
        torch.testing.assert_close(recached, direct)


def test_prompt_switch_changes_only_the_chunks_after_it(model, context, other_context):
    single = run(model, context, mode_config("histream"))
    for cfg in (mode_config("histream"), mode_config("histream").with_(kv_recache=False)):
        switched = run(model, [(0, context), (2, other_context)], cfg)
        assert torch.equal(switched[:, :, :6], single[:, :, :6])
        assert not torch.allclose(switched[:, :, 6:], single[:, :, 6:])
    recached = run(model, [(0, context), (2, other_context)], mode_config("histream"))
    plain = run(model, [(0, context), (2, other_context)], mode_config("histream").with_(kv_recache=False))
    assert not torch.allclose(recached[:, :, 6:], plain[:, :, 6:])


def test_prompt_schedule_must_start_at_chunk_zero(model, context, other_context):
    with pytest.raises(ValueError, match="chunk 0"):
        list(stream_video(model, [(1, context)], W, H, 37, mode_config("histream"), 0))
    with pytest.raises(ValueError, match="same chunk"):
        list(stream_video(model, [(0, context), (0, other_context)], W, H, 37, mode_config("histream"), 0))


@pytest.mark.parametrize("frame,chunk", [(0, 0), (1, 1), (9, 1), (10, 2), (13, 2), (21, 2), (45, 4), (48, 5)])
def test_chunk_at_frame_is_the_first_chunk_starting_at_or_after_it(frame, chunk):
    assert chunk_at_frame(frame, 3) == chunk
    first_frames = [0] + [4 * 3 * c - 3 for c in range(1, 8)]
    assert first_frames[chunk] >= frame and (chunk == 0 or first_frames[chunk - 1] < frame)


def test_fp8_kv_cache_stays_close_and_stores_float8(model, context):
    """Only the cached K/V are quantized: the first chunk (nothing cached) is identical, later chunks stay within a
    few percent on this random model (benchmarks/quality_delta.py measures the real-size model). A caller's
    caches must be fp8 as the config says."""
    caches = DualResCache.empty(model.cfg.num_layers, fp8=True)
    fp8 = run(model, context, mode_config("histream").with_(kv_cache_fp8=True), frames=21)
    plain = run(model, context, mode_config("histream"), frames=21)
    assert torch.equal(fp8[:, :, :3], plain[:, :, :3]) and not torch.equal(fp8, plain)  # latents [B, C, T, h, w]
    assert ((fp8 - plain).norm() / plain.norm()).item() < 0.01
    with torch.no_grad():
        for _ in stream_video(model, context, W, H, 21, mode_config("histream").with_(kv_cache_fp8=True), 0,
                              caches=caches):
            pass
    assert caches.high.keys[0].dtype == caches.low.values[0].dtype == torch.float8_e4m3fn


# -- what the loop feeds the model: noise, resampling, the low-resolution cache ----------------------------------------
def denoising_inputs(model, context, cfg, frames, seed=0):
    """[(chunk, kind, timestep, x given to the model, x0 it gave)] of every denoising call (cache passes left out)."""
    inputs, events = [], []
    forward = model.forward

    def spy(x, timestep, *args, **kwargs):
        inputs.append(x.clone())
        return forward(x, timestep, *args, **kwargs)

    model.forward = spy
    try:
        with torch.no_grad():
            list(stream_video(model, context, W, H, frames, cfg, seed, on_progress=events.append))
    finally:
        del model.forward
    calls = [e for e in events if e.x0 is not None]
    return [(e.chunk, e.kind, e.timestep, x, e.x0) for e, x in zip(calls, inputs, strict=True)]


def implied_noise(x, previous_x0, t):
    """The noise eps of x = (1 - sigma) * x0 + sigma * eps (flow matching's forward process, sigma = t / 1000)."""
    sigma = t / 1000
    return (x - (1 - sigma) * previous_x0) / sigma


def test_every_noise_draw_is_fresh(model, context):
    """Re-noising between steps draws new noise (reusing the initial noise would correlate the steps), and every chunk
    starts from its own noise (one noise for all chunks would repeat the same pattern along the video)."""
    calls = denoising_inputs(model, context, mode_config("histream"), 37)
    (_, _, t0, x_first, x0_first), (_, kind, t1, x_second, _) = calls[:2]
    assert kind == "low" and t0 == 1000.0
    eps = implied_noise(x_second, x0_first, t1)
    assert abs(eps.std().item() - 1) < 0.1 and abs(eps.mean().item()) < 0.1  # it is unit Gaussian noise
    assert not torch.allclose(eps, x_first, atol=1e-3)  # x_first is the initial noise (sigma = 1)
    starts = {}  # the first call of each chunk: its initial noise
    for chunk, _, _, x, _ in calls:
        starts.setdefault(chunk, x)
    for a, b in ((0, 1), (0, 2), (1, 2)):  # chunks 0-2 are full-size, chunk 3 has one frame
        assert not torch.allclose(starts[a], starts[b], atol=1e-3), (a, b)


def test_low_res_x0_is_upsampled_bicubically_then_renoised(model, context):
    """Algorithm 1, lines 7-11: the last low-resolution x0 is upsampled (SamplerConfig.upsample, bicubic) and re-noised
    to the first high-resolution timestep: what the first high call gets is that, plus one of the chunk's noises."""
    from histream_core.sampler import chunk_noise
    calls = denoising_inputs(model, context, mode_config("histream"), 5)  # one chunk: low, low, high, high
    (_, _, _, _, x0_low), (_, kind, t, x_high, _) = calls[1:3]
    assert kind == "high"
    up = torch.nn.functional.interpolate(x0_low[0].transpose(0, 1), size=(12, 8), mode="bicubic",
                                         align_corners=False).transpose(0, 1)[None]
    eps = implied_noise(x_high, up, t)
    assert any(torch.allclose(eps, chunk_noise(0, 0, draw, tuple(x_high.shape), x_high.device), atol=1e-4)
               for draw in range(8))


def test_low_res_cache_holds_the_area_downsampled_chunk(model, context):
    """Dual-resolution caching (lines 17-18): KV_low gets a timestep-0 pass of the clean chunk downsampled with
    SamplerConfig.downsample (area: the mean of each 2x2 block) at the low passes' RoPE factors."""
    cfg = mode_config("histream")
    caches = DualResCache.empty(model.cfg.num_layers)
    with torch.no_grad():
        chunks = stream_video(model, context, W, H, 13, cfg, 0, caches=caches)
        first = next(chunks).latents  # [1, 16, 3, 12, 8]
        fresh = KVCache(model.cfg.num_layers)
        low = torch.nn.functional.avg_pool3d(first, kernel_size=(1, 2, 2))
        model(low, torch.zeros(1), model.encode_text(context), cache=fresh, update_cache=True,
              settings=AttentionSettings(rope_factors=cfg.hd.rope_factors_low))
    assert caches.low.positions == fresh.positions == [0, 1, 2]
    for cached, direct in zip(caches.low.keys + caches.low.values, fresh.keys + fresh.values):
        torch.testing.assert_close(cached, direct)


def test_without_hd_tech_every_call_has_plain_rope_and_attention(context):
    """HDConfig(enabled=False) means plain RoPE and attention everywhere, the low-resolution passes included."""
    cfg = mode_config("histream").with_(hd=HDConfig(enabled=False))
    assert {(factors, scale) for _, _, factors, scale in hd_calls(context, cfg)} == {((1.0, 1.0, 1.0), 1.0)}


def test_low_res_grid_is_exact_where_floats_are_not():
    """1440 px at 0.7x is 1008 px, 126 latent px, though 180 * 0.7 is 125.99999999999999 in floats."""
    cfg = mode_config("histream").with_(low_res_scale=0.7)
    assert video_geometry(1440, 160, 1, cfg).low == (14, 126)


def test_modes_use_the_papers_shifts_and_steps():
    """modes.py's table: shift 7 at 1080p, Self-Forcing's 5 for self-forcing and the w/o-HD-tech ablation; HiStream+'s
    later chunks run base steps 1000 | 500, i.e. t = 1000 then 875 at shift 7."""
    assert {name: cfg.shift for name, cfg in MODES.items()} == {
        "histream": 7.0, "histream+": 7.0, "self-forcing": 5.0, "no-drc": 7.0, "no-agsw": 7.0, "two-step": 7.0,
        "no-hd": 5.0}
    cfg = mode_config("histream+")
    later = plan_video(video_geometry(W, H, 13, cfg), cfg)[1]
    assert later.low_steps == pytest.approx((1000.0,)) and later.high_steps == pytest.approx((875.0,))


def test_caches_given_must_fit_the_model_and_the_config(model, context):
    """Caller-owned caches with another layer count or another K/V dtype than the run's are refused (an fp8 ablation
    must not run in full precision unnoticed), and so is a seed that is not a whole number."""
    cfg = mode_config("histream").with_(kv_cache_fp8=True)
    for caches in (DualResCache.empty(model.cfg.num_layers), DualResCache.empty(model.cfg.num_layers + 3, fp8=True)):
        with pytest.raises(ValueError, match=r"make them with DualResCache.empty\(model.cfg.num_layers, fp8=cfg"):
            next(stream_video(model, context, W, H, 13, cfg, 0, caches=caches))
    with pytest.raises(ValueError, match="seed must be a whole number, got 1.5"):
        next(stream_video(model, context, W, H, 13, cfg, 1.5))


def test_caches_that_a_video_already_filled_are_refused(model, context):
    """One DualResCache per video: a used one would have the next video attend to the last one's frames."""
    cfg = mode_config("histream+")
    caches = DualResCache.empty(model.cfg.num_layers)
    with torch.no_grad():
        generate_video(model, context, W, H, 13, cfg, 0, caches=caches)  # fills them
    with pytest.raises(ValueError, match="needs empty caches: one DualResCache per video"):
        next(stream_video(model, context, W, H, 13, cfg, 0, caches=caches))


@pytest.mark.parametrize("make, message", [
    (lambda: StreamConfig(chunk_frames=2.5), "StreamConfig.chunk_frames must be a whole number, got 2.5"),
    (lambda: SamplerConfig(drc="no"), "SamplerConfig.drc must be True or False, got 'no'"),
    (lambda: SamplerConfig(low_res_scale=True), "SamplerConfig.low_res_scale must be a number, got True"),
    (lambda: HDConfig(rope_factors_high=(5.0,)), "rope_factors_high must hold 3 numbers"),
    (lambda: ChunkSteps(low=(), high="500"), "ChunkSteps.high must be a tuple of numbers, got '500'"),
])
def test_configs_refuse_wrong_types_where_they_are_built(make, message):
    """A config fails where it is built, not in the run ("no" would have switched DRC on, 2.5 crashed in the loop)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: ModelConfig(num_layers=0), "ModelConfig.num_layers must be positive"),
    (lambda: ModelConfig(dim=1536, num_heads=7), "must be divisible by num_heads"),
    (lambda: ModelConfig(freq_dim=255), "freq_dim must be even"),
    (lambda: ModelConfig(patch_size=(1, 2)), "patch_size must be three positive ints"),
    (lambda: ModelConfig(dim=40, num_heads=10), "cannot be split into three even RoPE axes"),  # head_dim 4
    (lambda: StreamConfig(chunk_frames=0), "chunk_frames must be >= 1"),
    (lambda: StreamConfig(anchor_frames=0, local_frames=0), "needs at least one anchor or local frame"),
    (lambda: ChunkSteps(low=(1000.0,), high=()), "at least one high-resolution step"),
    (lambda: ChunkSteps(low=(), high=(1500.0,)), "must lie in (0, 1000]"),
    (lambda: SamplerConfig(low_res_scale=1.5), "low_res_scale must be in (0, 1]"),
    (lambda: SamplerConfig(upsample="lanczos"), "upsample must be one of"),
    (lambda: SamplerConfig(downsample="lanczos"), "downsample must be one of"),
    (lambda: SamplerConfig(rope_positions="relative"), "rope_positions must be one of"),
    (lambda: with_knobs("histream", steps="4"), "unknown knob 'steps'"),
    (lambda: with_knobs("histream", shift="7"), "'7' is not a number"),
])
def test_configs_refuse_values_that_cannot_run(make, message):
    """Configs built by hand (the library's API) are checked where they are built, as the CLI's and nodes' are."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_config_sequences_are_stored_as_float_tuples():
    """Lists are accepted and kept as tuples of floats, so every config stays hashable and compares by value."""
    steps = ChunkSteps(low=[1000], high=[500])
    assert steps == ChunkSteps(low=(1000.0,), high=(500.0,)) and isinstance(steps.low, tuple)
    assert hash(SamplerConfig().with_(first_chunk=steps, hd=HDConfig(rope_factors_high=[1, 5, 5])))


@pytest.mark.parametrize("knob, low, high", [("low_res_scale", 0.1, 1.0), ("shift", 0.1, 100.0),
                                              ("ntk_factor_high", 0.1, 100.0), ("ntk_factor_low", 0.1, 100.0),
                                              ("first_chunk_attn_coef", 0.1, 100.0)])
def test_number_knobs_take_both_ends_of_their_range_and_nothing_beyond(knob, low, high):
    """KNOB_RANGES are closed intervals: each end is a value the mode runs with, the next float out is refused with
    the range in the message (a wider range let degenerate values through, a narrower one refused documented ones)."""
    from histream_core.modes import KnobError, knob_values
    for value in (low, high):
        assert knob_values(with_knobs("histream", **{knob: value}))[knob] == value
    for value in (math.nextafter(low, 0.0), math.nextafter(high, math.inf)):
        with pytest.raises(KnobError, match=re.escape(f"is out of range: use a number in [{low:g}, {high:g}]")):
            with_knobs("histream", **{knob: value})


def test_story_errors_name_the_prompt_the_chunk_it_would_start_in_and_the_first_frame_that_works():
    """StoryError's fields, which the Prompt Schedule node turns into its message: ``index`` is the prompt that
    cannot start there, ``chunk`` where it would start (its own chunk, also when it comes before the previous
    prompt), ``earliest_frame`` the first frame after the previous prompt's chunk."""
    from histream_core.sampler import StoryError, story_chunks
    assert story_chunks([0, 13, 40], 3) == [0, 2, 4]
    for frames, fields in (([0, 46, 47], (2, 5, 58)),   # both in chunk 6 (index 5)
                           ([0, 40, 20], (2, 2, 46)),   # out of order: frame 20 is chunk 3, frame 40 chunk 5
                           ([5, 40], (0, 0, None))):    # the first prompt not at frame 0
        with pytest.raises(StoryError) as info:
            story_chunks(frames, 3)
        assert (info.value.index, info.value.chunk, info.value.earliest_frame) == fields, frames


def test_caches_given_with_frames_in_either_resolution_are_refused(model, context):
    """A KV_low holding frames (a DualResCache whose high cache was emptied by hand) is a used cache too."""
    caches = DualResCache.empty(model.cfg.num_layers)
    k = torch.zeros(1, 4, model.cfg.num_heads, model.cfg.dim // model.cfg.num_heads)
    caches.low.write([(k, k.clone())] * model.cfg.num_layers, [0], tokens_per_frame=4)
    with pytest.raises(ValueError, match="needs empty caches: one DualResCache per video"):
        next(stream_video(model, context, W, H, 13, mode_config("histream"), 0, caches=caches))


def test_caches_that_do_not_fit_are_described_as_given_and_as_needed(model, context):
    """The message says what the caches hold and what the run needs, each with its own fp8 setting."""
    cfg = mode_config("histream")  # full-precision K/V
    caches = DualResCache.empty(model.cfg.num_layers + 3, fp8=True)
    with pytest.raises(ValueError, match=f"the caches given hold {model.cfg.num_layers + 3} layers in fp8, the run "
                                         f"needs {model.cfg.num_layers} \\(the model's layers"):
        next(stream_video(model, context, W, H, 13, cfg, 0, caches=caches))


def test_window_rope_policy_moves_both_resolutions_caches(model, context):
    """With window positions KV_low is re-indexed as KV_high is: at every denoising step both hold the same frames at
    the same window positions."""
    cfg = mode_config("histream").with_(rope_positions="window")
    caches = DualResCache.empty(model.cfg.num_layers)
    seen = []

    def record(progress):
        if progress.kind in ("low", "high"):
            seen.append((progress.chunk, list(caches.high.positions), list(caches.low.positions)))

    with torch.no_grad():
        list(stream_video(model, context, W, H, 37, cfg, 0, caches=caches, on_progress=record))
    assert {chunk: low for chunk, _, low in seen} == {0: [], 1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}
    assert all(high == low for _, high, low in seen)


def test_window_positions_turn_cached_keys_as_encoding_them_there_would(model, context):
    """Re-indexing rotates the cached keys along time with the time axis' RoPE factor. The first block's keys depend
    only on their frame and its position, so after the move they equal the frame encoded at its window position
    (HD's factors scale the spatial axes only: (1, 5, 5) at high resolution)."""
    cfg = mode_config("histream").with_(rope_positions="window")
    caches = DualResCache.empty(model.cfg.num_layers)
    snapshot = {}

    def grab(progress):
        if progress.chunk == 2 and progress.kind == "low" and not snapshot:
            snapshot["keys"] = caches.high.keys[0].clone()
            snapshot["positions"] = list(caches.high.positions)

    with torch.no_grad():
        video = torch.cat([c.latents for c in stream_video(model, context, W, H, 37, cfg, 0, caches=caches,
                                                           on_progress=grab)], dim=2)
        fresh = KVCache(model.cfg.num_layers)
        settings = AttentionSettings(rope_factors=cfg.hd.rope_factors_high)
        for frame, position in ((0, 0), (4, 1), (5, 2)):  # the anchor and the last two local frames, moved to 0-2
            model(video[:, :, frame:frame + 1], torch.zeros(1), model.encode_text(context), cache=fresh,
                  frame_start=position, update_cache=True, settings=settings)
    assert snapshot["positions"] == fresh.positions == [0, 1, 2]
    torch.testing.assert_close(snapshot["keys"], fresh.keys[0])


def test_recached_low_res_kv_equals_encoding_the_downsampled_window_under_the_new_prompt(model, context,
                                                                                          other_context):
    """The recache empties KV_low too before re-encoding it run by run: a run that still saw the old prompt's later
    frames in KV_low would attend to them (KV_high's twin: test_recached_kv_equals_encoding_the_window...)."""
    from histream_core.sampler import resize_latents
    caches = DualResCache.empty(model.cfg.num_layers)
    snapshot = {}

    def grab(progress):
        if progress.chunk == 2 and progress.kind == "low" and not snapshot:
            snapshot["keys"] = [k.clone() for k in caches.low.keys]
            snapshot["positions"] = list(caches.low.positions)

    cfg = mode_config("histream")
    low_size = video_geometry(W, H, 37, cfg).low
    with torch.no_grad():
        video = torch.cat([c.latents for c in stream_video(model, [(0, context), (2, other_context)], W, H, 37, cfg, 0,
                                                           caches=caches, on_progress=grab)], dim=2)
        fresh = KVCache(model.cfg.num_layers)
        text = model.encode_text(other_context)
        settings = AttentionSettings(rope_factors=cfg.hd.rope_factors_low)
        for first, count in ((0, 1), (4, 2)):
            model(resize_latents(video[:, :, first:first + count], low_size, cfg.downsample), torch.zeros(1), text,
                  cache=fresh, frame_start=first, update_cache=True, settings=settings)
    assert snapshot["positions"] == fresh.positions == [0, 4, 5]
    for recached, direct in zip(snapshot["keys"], fresh.keys):
        torch.testing.assert_close(recached, direct)


def test_rope_tables_are_kept_per_rope_factors_and_by_last_use(context):
    """A table belongs to its grid, start and RoPE factors: one model run in another mode on the same grid (HD's
    (1, 5, 5), then plain RoPE) must not get the first mode's tables. The 8 kept are the 8 last used."""
    cpu = torch.device("cpu")
    model = tiny_model(seed=3)
    hd = model._rope_tables((3, 4, 6), 0, (1.0, 5.0, 5.0), cpu)
    plain = model._rope_tables((3, 4, 6), 0, (1.0, 1.0, 1.0), cpu)
    assert not torch.equal(hd[0], plain[0])
    cfg = mode_config("self-forcing")
    with torch.no_grad():
        generate_video(model, context, W, H, 13, mode_config("histream"), 0)  # fills the tables with HD's factors
        torch.testing.assert_close(generate_video(model, context, W, H, 13, cfg, 0),
                                   generate_video(tiny_model(seed=3), context, W, H, 13, cfg, 0), rtol=0, atol=0)
    first = model._rope_tables((3, 4, 6), 100, (1.0, 1.0, 1.0), cpu)
    for start in range(101, 108):  # 7 more: 8 kept in all
        model._rope_tables((3, 4, 6), start, (1.0, 1.0, 1.0), cpu)
    assert model._rope_tables((3, 4, 6), 100, (1.0, 1.0, 1.0), cpu) is first  # used again: now the newest
    model._rope_tables((3, 4, 6), 108, (1.0, 1.0, 1.0), cpu)  # pushes out the least recently used (101), not it
    assert model._rope_tables((3, 4, 6), 100, (1.0, 1.0, 1.0), cpu) is first
