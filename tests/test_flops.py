"""Analytic FLOP count against torch's FlopCounterMode on the tiny model, and the 1.3B figures of DESIGN.md §7."""

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model
from histream_core.config import MODEL_PRESETS
from histream_core.flops import call_flops, run_flops
from histream_core.modes import MODES
from histream_core.sampler import ModelCall, plan_video, stream_video, video_geometry


@pytest.mark.parametrize("mode", list(MODES))
def test_analytic_flops_match_flop_counter(mode):
    model = tiny_model()
    context = torch.randn(1, 8, model.cfg.text_dim)
    # CPU SDPA kernels are invisible to FlopCounterMode; the math backend decomposes into counted bmm.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        list(stream_video(model, context, 64, 96, 29, MODES[mode], seed=0))
    expected = run_flops(model.cfg, MODES[mode], 64, 96, 29, mode).flops_total
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_prompt_schedule_recache_is_counted():
    model = tiny_model()
    prompts = [(0, torch.randn(1, 8, model.cfg.text_dim)), (2, torch.randn(1, 5, model.cfg.text_dim))]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        list(stream_video(model, prompts, 64, 96, 37, MODES["histream+"], seed=0))
    expected = run_flops(model.cfg, MODES["histream+"], 64, 96, 37, prompt_switches=frozenset({2}))
    assert counter.get_total_flops() == pytest.approx(expected.flops_total, rel=0.01)
    assert expected.model_calls == run_flops(model.cfg, MODES["histream+"], 64, 96, 37).model_calls + 4


def test_1p3b_1080p_matches_design_table():
    """DESIGN.md section 7 counts Algorithm 1 literally: a cache pass per resolution after every chunk. We skip the
    last chunk's (nothing reads them); added back, the count must match the design's within 2%."""
    cfg = MODEL_PRESETS["wan2.1-1.3b"]
    design = {"self-forcing": 17_600, "histream": 6_180, "histream+": 4_320}
    for mode, tflop in design.items():
        run = run_flops(cfg, MODES[mode], 1920, 1088, 81, mode)
        geometry = video_geometry(1920, 1088, 81, MODES[mode])
        last = plan_video(geometry, MODES[mode])[-1]
        skipped = [ModelCall(kind, 0.0, geometry.high if kind == "cache_high" else geometry.low, last.num_frames,
                             last.cached_frames) for kind in ("cache_high", "cache_low")[:1 + MODES[mode].drc]]
        literal = run.flops_total + sum(call_flops(cfg, c) for c in skipped)
        assert literal / 1e12 == pytest.approx(tflop, rel=0.02), mode


def test_flops_command_json():
    out = subprocess.run([sys.executable, "-m", "histream_core", "flops", "--model", "wan2.1-1.3b", "--width", "1920",
                          "--height", "1088", "--frames", "81", "--json"], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)
    assert set(MODES) <= set(table)
    assert table["histream+"]["model_calls"] == 4 + 2 + 5 * (2 + 2) + 2  # the last chunk writes no cache
    assert table["histream"]["tflop_per_frame"] > table["histream+"]["tflop_per_frame"]
