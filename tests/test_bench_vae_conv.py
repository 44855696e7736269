"""benchmarks/bench_vae_conv.py decides how the VAE's convolutions should be computed: its formulations must be the
causal conv3d exactly, and its shape census must be the decode's real convolutions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from histream_core.vae import WanVAE, WanVAEConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vae_conv.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vae_conv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("padded_frames", [3, 6])
@pytest.mark.parametrize("channels", [(5, 7), (8, 8)])
def test_every_formulation_is_the_causal_conv3d(bench, padded_frames, channels):
    c_in, c_out = channels
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, c_in, padded_frames, 6, 9, generator=generator, dtype=torch.float64)
    w = torch.randn(c_out, c_in, 3, 3, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(c_out, generator=generator, dtype=torch.float64)
    expected = F.conv3d(x, w, b, padding=(0, 1, 1))
    for name, build in bench.CAUSAL_3X3X3.items():
        run, to_ncdhw = build(x, w, b)
        got = to_ncdhw(run())
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_the_census_counts_the_decodes_convolution_flops(bench):
    config = WanVAEConfig(base_dim=8)
    calls = bench.decode_conv_calls(config, width=64, height=32, frames=9)
    with torch.device("meta"):
        vae = WanVAE(config).eval()
    latents = torch.zeros(1, config.z_dim, 3, 4, 8, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for _ in vae.decode_stream(latents[:, :, i:i + 1] for i in range(3)):
            pass
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert sum(bench.conv_flops(call) * n for call, n in calls.items()) == conv_flops
    assert sum(n for call, n in calls.items() if len(call[1]) == 5 and call[1][2:] == (3, 3, 3)) > 0


def test_the_script_runs_small_and_finds_every_formulation_exact(bench, tmp_path, capsys):
    out = tmp_path / "conv.json"
    bench.main(["--device", "cpu", "--tiny", "--width", "64", "--height", "32", "--frames", "9", "--dtype", "fp32",
                "--top", "2", "--iters", "1", "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {row["formulation"] for row in rows} >= set(bench.CAUSAL_3X3X3)
    assert all(row["exact"] and row["rel_error"] < 1e-5 for row in rows)
    assert "WRONG" not in capsys.readouterr().out
