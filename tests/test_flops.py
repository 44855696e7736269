"""Analytic FLOP count against torch's FlopCounterMode on the tiny model, and the 1.3B figures of the project's design hand count."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model
from histream_core.config import MODEL_PRESETS
from histream_core.flops import call_flops, run_flops, text_flops
from histream_core.modes import MODES
from histream_core.sampler import plan_video, stream_video, video_geometry


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
    """The design's hand count takes Algorithm 1 literally: a full forward as the cache pass per resolution after every
    chunk. We skip the last chunk's (nothing reads them) and stop the others at the last block's K/V; counted the
    literal way, our plan must match the design's within 2%."""
    cfg = MODEL_PRESETS["wan2.1-1.3b"]
    design = {"self-forcing": 17_600, "histream": 6_180, "histream+": 4_320}
    for mode, tflop in design.items():
        sampler_cfg = MODES[mode]
        geometry = video_geometry(1920, 1088, 81, sampler_cfg)
        plans = [dataclasses.replace(plan, writes_cache=True) for plan in plan_video(geometry, sampler_cfg)]
        calls = [call for plan in plans for call in plan.calls(geometry, sampler_cfg.drc)]
        full_forwards = [dataclasses.replace(call, kind=call.kind.removeprefix("cache_")) for call in calls]
        assert not any(call.writes_only for call in full_forwards)
        literal = sum(call_flops(cfg, call) for call in full_forwards) + text_flops(cfg)
        assert literal / 1e12 == pytest.approx(tflop, rel=0.02), mode
        assert run_flops(cfg, sampler_cfg, 1920, 1088, 81).flops_total < literal


def test_flops_command_json():
    out = subprocess.run([sys.executable, "-m", "histream_core", "flops", "--model", "wan2.1-1.3b", "--width", "1920",
                          "--height", "1088", "--frames", "81", "--json"], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)
    assert set(MODES) <= set(table)
    assert table["histream+"]["model_calls"] == 4 + 2 + 5 * (2 + 2) + 2  # the last chunk writes no cache
    assert table["histream"]["tflop_per_frame"] > table["histream+"]["tflop_per_frame"]


def test_every_prompt_of_a_schedule_is_counted_exactly():
    """The count is exact (not within 1%): each prompt's text embedding and cross-attention K/V are computed once, a
    switch adds its recache passes. The 1% of the tests above would hide a prompt's text FLOPs (0.5% here)."""
    model = tiny_model()
    prompts = [(0, torch.randn(1, 8, model.cfg.text_dim)), (1, torch.randn(1, 5, model.cfg.text_dim)),
               (2, torch.randn(1, 3, model.cfg.text_dim))]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        list(stream_video(model, prompts, 64, 96, 37, MODES["histream+"], seed=0))
    expected = run_flops(model.cfg, MODES["histream+"], 64, 96, 37, prompt_switches=frozenset({1, 2}))
    assert counter.get_total_flops() == expected.flops_total


def test_table_units_follow_the_size_of_the_run():
    """The tiny model's run is megaFLOPs: its table says so instead of printing 0.0 TFLOP everywhere."""
    from histream_core.flops import flops_table, format_table
    tiny = format_table(flops_table(MODEL_PRESETS["tiny"], 64, 64, 17), 798.0).splitlines()
    assert tiny[0].split()[3:] == ["MFLOP", "total", "MFLOP/frame", "floor", "ns/frame"]
    total, per_frame, floor = map(float, tiny[2].split()[2:])
    assert total > 1 and floor == pytest.approx(per_frame / 798.0 * 1e3, abs=0.06)  # MFLOP / (TFLOP/s) = ns * 1e3
    full = format_table(flops_table(MODEL_PRESETS["wan2.1-1.3b"], 1920, 1088, 81), 798.0).splitlines()
    assert "TFLOP total" in full[0] and "floor ms/frame" in full[0]


def test_flop_units_switch_at_one_of_the_larger_unit():
    """A table shows FLOPs in the largest unit in which its largest run reads at least 1, with the floor's time unit
    that goes with it (TFLOP at TFLOP/s: ms per 1e3; GFLOP: us; MFLOP: ns), and MFLOP below that."""
    from histream_core.flops import flop_unit
    assert flop_unit(1234.0) == flop_unit(1.0) == ("TFLOP", 1.0, "ms")
    assert flop_unit(0.999) == flop_unit(1e-3) == ("GFLOP", 1e3, "us")
    assert flop_unit(0.999e-3) == flop_unit(1e-6) == ("MFLOP", 1e6, "ns")
    assert flop_unit(1e-9) == ("MFLOP", 1e6, "ns")  # under one MFLOP still has a unit
    assert flop_unit(0.0) == ("MFLOP", 1e6, "ns")


def test_timing_table_floor_fractions_keep_their_digits_below_one_percent():
    """The bench table's 'of floor' column: whole percents from 1% up, two significant digits below (the tiny model
    runs at a fraction of a percent of the H100 floor, which read 0%); FLOPs and rates in the table's unit."""
    from histream_core.timing import ModeTiming, format_timings

    def row(mode, floor_fraction, tflop):
        return ModeTiming(mode, 0.5, 8.5, tflop, 2 * tflop, floor_fraction, 6, [1.0], None, None, None)

    table = format_timings([row("a", 0.5, 2e-3), row("b", 0.0123, 1e-3), row("c", 0.004, 1e-3),
                            row("d", 0.01, 1e-3)]).splitlines()
    assert table[0].split()[2:6] == ["GFLOP", "GFLOP/s", "of", "floor"]
    cells = {line.split()[0]: line.split()[2:5] for line in table[2:]}
    assert cells == {"a": ["2.0", "4.0", "50%"], "b": ["1.0", "2.0", "1%"], "c": ["1.0", "2.0", "0.4%"],
                     "d": ["1.0", "2.0", "1%"]}
