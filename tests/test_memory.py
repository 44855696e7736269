"""Memory: the live-bytes meter, the fused-attention model on meta, what a model call holds, the decode orders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from histream_core.cache import KVCache
from histream_core.config import MODEL_PRESETS
from histream_core.memory import LiveTensorBytes, fused_attention_on_meta, predict_memory
from histream_core.modes import mode_config
from histream_core.pipeline import DECODE_ORDERS, decoded_chunks, embedded_default, random_text_embedding
from histream_core.vae import TiledDecoder, WanVAEConfig

MiB = 2**20


def test_meter_counts_storages_once_until_freed() -> None:
    meter = LiveTensorBytes()
    with meter:
        a = torch.empty(256, 1024, device="meta")  # 1 MiB
        b = a * 2                                  # +1 MiB
        view = b[:10]                              # a view: no new storage
        assert meter.live == 2 * MiB
        del b
        assert meter.live == 2 * MiB               # the view keeps b's storage alive
        del view
        assert meter.live == MiB
        c = torch.cat([a, a])                      # +2 MiB
        assert (meter.live, meter.peak) == (3 * MiB, 3 * MiB)
        del c
        meter.reset_peak()
        assert (meter.live, meter.peak) == (MiB, MiB)


def test_attention_on_meta_allocates_like_a_fused_kernel() -> None:
    q, k, v = (torch.empty(1, 2, 4096, 64, device="meta", dtype=torch.bfloat16) for _ in range(3))
    out_bytes, lse_bytes = q.nbytes, 2 * 4096 * 4
    real = F.scaled_dot_product_attention
    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta():
        out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert meter.peak == out_bytes + lse_bytes  # the math path would hold the 2 x 4096 x 4096 scores
    assert F.scaled_dot_product_attention is real


def _call_transient(num_layers: int, update_cache: bool) -> int:
    """Peak bytes a chunk's model call adds on top of what stays alive after it (weights, caches)."""
    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta(), torch.no_grad(), torch.device("meta"):
        model = tiny_model(cfg=MODEL_PRESETS["tiny"].with_(num_layers=num_layers))
        text = model.encode_text(torch.empty(1, 8, model.cfg.text_dim))
        cache, x = KVCache(num_layers), torch.empty(1, model.cfg.in_dim, 3, 32, 32)
        model(x, torch.zeros(1), text, cache=cache, update_cache=True)  # a first chunk in the cache
        meter.reset_peak()
        model(x, torch.zeros(1), text, cache=cache, frame_start=3, update_cache=update_cache)
        return meter.peak - meter.live


@pytest.mark.parametrize("update_cache", [False, True])
def test_a_model_call_holds_one_blocks_activations(update_cache: bool) -> None:
    """Denoising calls drop each block's K/V with the block and cache passes store them as they go, so what a call
    holds beyond its results does not grow with depth (it once held every block's K/V to the end)."""
    assert _call_transient(2, update_cache) == _call_transient(6, update_cache)


@pytest.fixture(scope="module")
def tiny_prediction():
    return predict_memory(MODEL_PRESETS["tiny"], WanVAEConfig(base_dim=8), 128, 96, 17, mode_config("histream"),
                          torch.float32)


def test_prediction_is_consistent(tiny_prediction) -> None:
    p = tiny_prediction
    assert 0 < p.dit_weights < p.denoise_peak and 0 < p.vae_weights < p.decode_peak and p.dit_caches > 0
    after, interleaved = p.end_to_end["after"], p.end_to_end["interleaved"]
    # decoding after denoising needs the larger step (with the other model's weights resident), not their sum
    assert after >= max(p.denoise_peak + p.vae_weights, p.decode_peak + p.dit_weights)
    assert after <= max(p.denoise_peak + p.vae_weights, p.decode_peak + p.dit_weights) * 1.05
    # interleaved decodes while the DiT holds its caches
    assert interleaved >= p.decode_peak + p.dit_weights + p.dit_caches
    assert "end to end, decode order 'after'" in p.table() and p.as_dict()["dit_weights_gib"] >= 0


@pytest.mark.parametrize("tiled", [False, True])
def test_decode_orders_give_the_same_frames(tiled: bool) -> None:
    model, vae = embedded_default()
    decoder = TiledDecoder(vae, tile=6, overlap=2, segment_frames=3) if tiled else vae  # segments of 1 chunk
    text = random_text_embedding("a fox", model.cfg.text_dim)
    frames = {}
    with torch.no_grad():
        for order in DECODE_ORDERS:
            chunks = list(decoded_chunks(model, decoder, text, 64, 64, 25, mode_config("histream+"), 3, order=order))
            assert [chunk.index for chunk, _, _ in chunks] == [0, 1, 2]
            assert all(seconds >= 0 for _, _, seconds in chunks)
            frames[order] = torch.cat([video for _, video, _ in chunks], dim=2)
    assert frames["after"].shape[2] == 25
    assert torch.equal(frames["after"], frames["interleaved"]) and torch.equal(frames["after"], frames["overlapped"])
    with pytest.raises(ValueError, match="decode order 'sideways'.*after"):
        next(decoded_chunks(model, decoder, text, 64, 64, 17, mode_config("histream+"), 3, order="sideways"))


def test_after_decodes_once_every_chunk_is_denoised(monkeypatch) -> None:
    """"after": the sampler (and its caches) is done before the VAE gets the first chunk; "interleaved": each chunk
    is decoded as soon as it is denoised. The frames are the same, so the order of events is what tells them apart."""
    import histream_core.pipeline as pipeline
    events, stream_video = [], pipeline.stream_video

    def logged_stream(*args, **kwargs):
        for chunk in stream_video(*args, **kwargs):
            events.append(f"denoised {chunk.index}")
            yield chunk

    class LoggedDecoder:
        def __init__(self, vae) -> None:
            self.vae = vae

        def decode_stream(self, chunks):
            def logged():
                for index, latents in enumerate(chunks):
                    events.append(f"decode {index}")
                    yield latents
            return self.vae.decode_stream(logged())

    monkeypatch.setattr(pipeline, "stream_video", logged_stream)
    model, vae = embedded_default()
    text = random_text_embedding("a fox", model.cfg.text_dim)
    expected = {"after": ["denoised 0", "denoised 1", "denoised 2", "decode 0", "decode 1", "decode 2"],
                "interleaved": ["denoised 0", "decode 0", "denoised 1", "decode 1", "denoised 2", "decode 2"]}
    for order, events_in_order in expected.items():
        events.clear()
        with torch.no_grad():
            list(decoded_chunks(model, LoggedDecoder(vae), text, 64, 64, 25, mode_config("histream+"), 3, order=order))
        assert events == events_in_order, order


def test_host_memory_is_not_counted() -> None:
    meter = LiveTensorBytes()
    with meter:
        on_host = torch.empty(256, 1024)
        on_device = torch.empty(256, 1024, device="meta")
        assert meter.live == MiB and on_host.nbytes == on_device.nbytes


def test_overlapped_decode_surfaces_errors_and_ends_its_worker() -> None:
    """An interrupt in the sampler and an error in the decoder's thread both reach the caller, and the worker
    thread is gone afterwards (nothing left decoding in the background)."""
    import threading

    from histream_core.sampler import GenerationInterrupted
    model, vae = embedded_default()
    text = random_text_embedding("a fox", model.cfg.text_dim)
    calls = iter(range(100))
    with torch.no_grad(), pytest.raises(GenerationInterrupted):
        list(decoded_chunks(model, vae, text, 64, 64, 25, mode_config("histream+"), 3, order="overlapped",
                            should_stop=lambda: next(calls) == 8))  # in chunk 2

    class Broken:
        def decode_stream(self, chunks):
            next(iter(chunks))
            raise RuntimeError("decoder broke")
            yield  # a generator, like every decoder's stream

    with torch.no_grad(), pytest.raises(RuntimeError, match="decoder broke"):
        list(decoded_chunks(model, Broken(), text, 64, 64, 25, mode_config("histream+"), 3, order="overlapped"))
    assert not any(t.name == "histream-decode" for t in threading.enumerate())


def test_overlapped_decode_hands_out_frames_mid_stream_in_order(monkeypatch) -> None:
    """Frames the decode worker finished while the next chunk was denoised come out before the sampler ends (the path
    of a real run; on a CPU the worker rarely finishes in time, so the sampler is slowed here), each with its own
    chunk, and they equal "after"'s."""
    import time

    import histream_core.pipeline as pipeline
    real_stream, denoised = pipeline.stream_video, []

    def slow_stream(*args, **kwargs):  # leaves the worker time to finish each chunk before the next one exists
        for index, chunk in enumerate(real_stream(*args, **kwargs)):
            if index:
                time.sleep(0.5)
            denoised.append(chunk.index)
            yield chunk

    model, vae = embedded_default()
    text = random_text_embedding("a fox", model.cfg.text_dim)
    cfg = mode_config("histream+")
    with torch.no_grad():
        after = list(decoded_chunks(model, vae, text, 64, 64, 37, cfg, 0, order="after"))
    monkeypatch.setattr(pipeline, "stream_video", slow_stream)
    order = []
    with torch.no_grad():
        for chunk, video, _ in decoded_chunks(model, vae, text, 64, 64, 37, cfg, 0, order="overlapped"):
            order.append((chunk.index, video.shape[2]))
            if chunk.index == 0:
                assert len(denoised) < 4  # the first chunk's frames came out before the sampler was done
                first_video = video
    assert order == [(c.index, v.shape[2]) for c, v, _ in after] == [(0, 9), (1, 12), (2, 12), (3, 4)]
    torch.testing.assert_close(first_video, after[0][1])


def test_long_requests_run_capped_only_with_the_sliding_window() -> None:
    tiny, vae = MODEL_PRESETS["tiny"], WanVAEConfig(base_dim=8)
    windowed = predict_memory(tiny, vae, 64, 64, 85, mode_config("histream+"), torch.float32, orders=())
    full_cache = predict_memory(tiny, vae, 64, 64, 85, mode_config("self-forcing"), torch.float32, orders=())
    assert windowed.frames_run == 81 and full_cache.frames_run == 85


def test_caches_between_chunks_are_the_largest_cache_held() -> None:
    """Without the sliding window the caches grow chunk by chunk: dit_caches is what they hold before the last chunk,
    so 3 more latent frames add exactly their K/V (2 blocks x K and V x (16 + 4 tokens) x 48 x fp32 per frame)."""
    tiny, vae = MODEL_PRESETS["tiny"], WanVAEConfig(base_dim=8)
    short, longer = (predict_memory(tiny, vae, 64, 64, frames, mode_config("no-agsw"), torch.float32, orders=())
                     for frames in (13, 25))  # 4 and 7 latent frames: 3 and 6 frames cached before the last chunk
    per_frame = 2 * 2 * (4 * 4 + 2 * 2) * tiny.dim * 4
    assert longer.dit_caches - short.dit_caches == 3 * per_frame
