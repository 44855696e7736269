"""Shared test helpers: tiny random Wan models (no weights, no GPU, no network)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from histream_core.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from histream_core.model import CausalWanModel  # noqa: E402
from histream_core.model.layers import check_fp8_matmul  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def fp8_matmul_runs_on_the_cpu() -> bool:
    """PyTorch 2.13 (what CI installs) multiplies fp8 with per-row scales on the CPU; 2.11 does not."""
    try:
        check_fp8_matmul(torch.device("cpu"))
    except ValueError:
        return False
    return True


FP8_MATMUL_ON_CPU = fp8_matmul_runs_on_the_cpu()
needs_fp8_matmul = pytest.mark.skipif(not FP8_MATMUL_ON_CPU, reason=f"PyTorch {torch.__version__} cannot multiply "
                                      "fp8 with per-row scales on the CPU (2.13 can)")


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random, well-scaled value (Wan zero-inits some, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.ndim >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


def tiny_model(seed: int = 0, cfg: ModelConfig | None = None, **changes) -> CausalWanModel:
    cfg = (cfg or MODEL_PRESETS["tiny"]).with_(**changes)
    return randomize_(CausalWanModel(cfg), seed).eval()


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return MODEL_PRESETS["tiny"]
