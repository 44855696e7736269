"""fp8 matmul option: Fp8Linear against a hand-quantized reference, the model-level switch, its errors and users."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from conftest import needs_fp8_matmul, tiny_model
from histream_core.cli import main
from histream_core.config import MODEL_PRESETS
from histream_core.memory import predict_memory
from histream_core.model.layers import CastLinear, Fp8Input, Fp8Linear, check_fp8_matmul
from histream_core.modes import mode_config
from histream_core.pipeline import EMBEDDED_VAE
from histream_core.sampler import stream_video

FP8 = torch.float8_e4m3fn


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def linear(in_dim: int = 64, out_dim: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        layer.weight[3] *= 50  # rows of very different size: one scale per row must follow them
    return layer


def hand_quantized(t: torch.Tensor) -> torch.Tensor:
    """Round each row to e4m3 after scaling its largest magnitude to 448 (scale and quotient rounded to t's dtype
    first, as documented), and scale back (float64)."""
    scale = (t.double().abs().amax(-1, keepdim=True) / 448).to(t.dtype).double()
    return (t.double() / scale).to(t.dtype).to(FP8).double() * scale


@needs_fp8_matmul
def test_fp8_linear_is_the_product_of_its_rounded_operands():
    layer = linear()
    x = (torch.randn(2, 5, 64) * torch.linspace(0.01, 10, 5)[None, :, None]).to(torch.bfloat16)
    got = Fp8Linear.from_linear(layer)(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.bfloat16
    want = hand_quantized(x) @ hand_quantized(layer.weight.detach()).T + layer.bias.detach().to(
        torch.bfloat16).double()
    assert relative_error(got, want) < 4e-3  # bf16 output rounding only
    # ... and that rounding is what fp8 costs against the exact product (not zero, not more than e4m3's 3 bits).
    exact = x.double() @ layer.weight.detach().double().T + layer.bias.detach().double()
    assert 5e-3 < relative_error(got, exact) < 6e-2


def test_each_weight_row_keeps_its_own_scale():
    fp8 = Fp8Linear.from_linear(linear())
    assert fp8.weight.dtype == FP8 and fp8.weight_scale.shape == (1, 48)
    assert torch.all(fp8.weight.float().abs().amax(1) == 448)  # every row's largest weight maps to e4m3's largest
    assert fp8.weight_scale[0, 3] > 20 * fp8.weight_scale[0, 2]


def test_raw_fp8_weights_are_used_as_stored():
    layer = linear()
    layer.weight.data = layer.weight.data.to(FP8)
    fp8 = Fp8Linear.from_linear(layer)
    assert torch.equal(fp8.weight.view(torch.uint8), layer.weight.view(torch.uint8))
    assert torch.all(fp8.weight_scale == 1)


def test_fp8_linear_takes_bf16_only():
    with pytest.raises(ValueError, match="bf16 inputs.*compute dtype bf16"):
        Fp8Linear.from_linear(linear())(torch.randn(3, 64))


def bf16_tiny(seed: int = 0):
    model = tiny_model(seed)
    model.compute_dtype = torch.bfloat16
    return model


@needs_fp8_matmul
def test_use_fp8_matmul_converts_the_block_linears_only():
    model = bf16_tiny().use_fp8_matmul()
    in_blocks = [m for m in model.blocks.modules() if isinstance(m, (CastLinear, Fp8Linear))]
    assert len(in_blocks) == 10 * model.cfg.num_layers and all(isinstance(m, Fp8Linear) for m in in_blocks)
    assert isinstance(model.head.head, CastLinear) and isinstance(model.time_projection[1], CastLinear)
    assert model.uses_fp8_matmul and not bf16_tiny().uses_fp8_matmul


@needs_fp8_matmul
def test_fp8_matmul_video_stays_close_to_bf16():
    context = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    cfg = mode_config("histream")

    def latents(model):
        with torch.no_grad():
            return [c.latents for c in stream_video(model, context, 64, 64, 21, cfg, seed=3)]

    reference, fast = latents(bf16_tiny()), latents(bf16_tiny().use_fp8_matmul())
    assert len(fast) == len(reference) == 2
    errors = [relative_error(f, r) for f, r in zip(fast, reference)]
    assert all(1e-4 < e < 0.1 for e in errors), errors


def test_use_fp8_matmul_errors_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="needs the bf16 compute dtype.*load it with compute dtype bf16"):
        tiny_model().use_fp8_matmul()
    with pytest.raises(ValueError, match="before compile_blocks"):
        bf16_tiny().compile_blocks().use_fp8_matmul()

    def no_fp8(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")
    monkeypatch.setattr(torch, "_scaled_mm", no_fp8)
    with pytest.raises(ValueError, match="does not run on cpu.*keep the bf16 matmuls"):
        bf16_tiny().use_fp8_matmul()
    with pytest.raises(ValueError, match="does not run on meta \\(it needs fp8 tensor cores \\(Ada, Hopper or newer"):
        check_fp8_matmul(torch.device("meta"))  # any device but the CPU is a GPU that lacks them


def test_an_old_pytorch_on_the_cpu_is_named(monkeypatch):
    def per_tensor_only(*args, **kwargs):  # PyTorch 2.11's message, word for word
        raise RuntimeError("(scale_a.numel() == 1 && scale_b.numel() == 1) INTERNAL ASSERT FAILED at \"/pytorch/aten/"
                           "src/ATen/native/Blas.cpp\":249. Now _scaled_mm only supports per-tensor scaling for CPU "
                           "backend.")
    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    with pytest.raises(ValueError, match=f"does not run on cpu \\(PyTorch {re.escape(torch.__version__)} multiplies "
                       "fp8 on the CPU with one scale per tensor only; PyTorch 2.13 or a CUDA GPU"):
        bf16_tiny().use_fp8_matmul()


@needs_fp8_matmul
def test_cli_fp8_matmul(tmp_path, capsys):
    small = ["--width", "64", "--height", "64", "--frames", "9", "--device", "cpu"]
    assert main(["generate", *small, "--dtype", "fp32", "--fp8-matmul", "--out", str(tmp_path / "a.mp4")]) == 2
    assert "add --dtype bf16" in capsys.readouterr().err
    assert main(["generate", *small, "--dtype", "bf16", "--fp8-matmul", "--out", str(tmp_path / "b.mp4")]) == 0
    assert (tmp_path / "b.mp4").stat().st_size > 0
    capsys.readouterr()
    assert main(["memory", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "9", "--fp8-matmul"]) == 0
    assert "DiT weights" in capsys.readouterr().out
    assert main(["memory", "--model", "tiny", "--width", "64", "--height", "64", "--frames", "9", "--fp8-matmul",
                 "--dtype", "fp32"]) == 2
    assert "add --dtype bf16" in capsys.readouterr().err


def test_memory_prediction_counts_fp8_block_weights():
    args = (MODEL_PRESETS["tiny"], EMBEDDED_VAE, 64, 64, 9, mode_config("histream"))
    plain, fast = predict_memory(*args), predict_memory(*args, fp8_matmul=True)
    # the blocks' weights are most of the model (fp32 biases, norms, modulation stay), now one byte each
    assert 0.3 * plain.dit_weights < fast.dit_weights < 0.75 * plain.dit_weights
    assert fast.dit_caches == plain.dit_caches
    stored = predict_memory(*args, fp8_weights=True)  # the loader's fp8 storage: the same weights, upcast per call
    assert stored.dit_weights == fast.dit_weights and stored.dit_caches == plain.dit_caches


@needs_fp8_matmul
def test_each_gemm_input_is_quantized_once(monkeypatch):
    """q, k and v read the same input: one quantization serves them (the eager path pays per quantization)."""
    import histream_core.model.layers as layers
    model = bf16_tiny().use_fp8_matmul()
    text = model.encode_text(torch.randn(1, 8, 32))
    quantized = []
    original = layers.quantize_fp8
    monkeypatch.setattr(layers, "quantize_fp8", lambda t, dtype: quantized.append(t.shape) or original(t, dtype))
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), text)
    # per block: q/k/v, o, cross-attention q, cross-attention o, FFN in, FFN hidden
    assert len(quantized) == 6 * model.cfg.num_layers


def test_fused_quantization_matches_the_eager_one():
    """On CUDA, eager runs quantize in one compiled kernel; it must give what quantize_fp8 gives."""
    x = (torch.randn(3, 40, 64) * torch.logspace(-3, 2, 40)[None, :, None]).to(torch.bfloat16)
    eager, fused = Fp8Input.of(x, fused=False), Fp8Input.of(x, fused=True)
    assert fused.leading_shape == eager.leading_shape == (3, 40)
    assert relative_error(fused.values.float() * fused.scale, x.reshape(-1, 64)) < 0.05
    if torch_version() >= (2, 13):  # bit for bit: with emulate_precision_casts inductor rounds to bf16 where eager does
        assert torch.equal(fused.scale, eager.scale)
        assert torch.equal(fused.values.view(torch.uint8), eager.values.view(torch.uint8))
    else:  # PyTorch 2.11's CPU inductor keeps the scale in fp32 (measured: 1.6% of the values one e4m3 step apart)
        assert torch.allclose(fused.scale, eager.scale, rtol=2 ** -8, atol=0)
        assert relative_error(fused.values.float() * fused.scale, x.reshape(-1, 64)) <= 1.01 * relative_error(
            eager.values.float() * eager.scale, x.reshape(-1, 64))


def torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split(".")[:2])
