"""GPU kernel time of a torch.profiler trace grouped by kind (attention, GEMM, conv, copies, elementwise), for the
profiling scripts and bench_1080p.py --profile."""

from __future__ import annotations

from collections import defaultdict

import torch

CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "cublas", "splitk")),
    ("conv", ("conv",)),
    ("copy/cat", ("copy", "cat", "memcpy", "memset")),
    ("elementwise/norm", ("elementwise", "vectorized", "reduce", "norm", "triton", "mul", "add")),
)


def category(name: str, categories=CATEGORIES) -> str:
    lowered = name.lower()
    for label, needles in categories:
        if any(n in lowered for n in needles):
            return label
    return "other"


def print_kernel_table(prof, title: str, frames: int, top: int, categories=CATEGORIES, gpu: bool = True) -> None:
    """GPU kernel time of a profile by category and by kernel (``gpu=False``: the CPU ops' own time instead)."""
    totals, kernels = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        if gpu:
            us = getattr(event, "device_time_total", 0.0) if event.device_type == torch.autograd.DeviceType.CUDA else 0
        else:
            us = event.self_cpu_time_total
        if us:
            totals[category(event.key, categories)] += us
            kernels[event.key] += us
    whole = sum(totals.values())
    print(f"{title}: {'GPU kernel' if gpu else 'CPU op'} time {whole / 1e6:.2f} s ({whole / 1e6 / frames:.4f} s/frame)")
    for label, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<18}{us / 1e6:>8.2f} s {us / whole:>6.1%}")
    print("top kernels:")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e6:>7.3f} s  {name[:110]}")
