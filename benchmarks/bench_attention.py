"""Attention kernels at HiStream's shapes: TFLOP/s of each backend behind histream_core's one attention function.

    python benchmarks/bench_attention.py   # CUDA; 1.3B heads, 1080p chunk (3 frames) against 3 cached frames
    python benchmarks/bench_attention.py --device cpu --tokens-per-frame 64 --iters 1   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histream_core.model.attention import BACKENDS, AttentionBackendError, attention  # noqa: E402

def shapes(tokens_per_frame: int) -> dict[str, tuple[int, int]]:
    """name: (query tokens, key tokens) of HiStream's attention calls; 8160 tokens per frame at 1080p."""
    low = tokens_per_frame // 4
    return {"1080p chunk, 3 cached": (3 * tokens_per_frame, 6 * tokens_per_frame),
            "1080p chunk, no cache": (3 * tokens_per_frame, 3 * tokens_per_frame),
            "540p chunk, 3 cached": (3 * low, 6 * low)}


def _time_ms(run, device: torch.device, iters: int) -> float:
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / iters
    began = time.perf_counter()
    for _ in range(iters):
        run()
    return 1000 * (time.perf_counter() - began) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tokens-per-frame", type=int, default=8160, help="8160 at 1080p; small for a smoke test")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    versions = f", cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else ""
    print(f"attention, {args.heads} heads x {args.head_dim}, {dtype}, torch {torch.__version__}{versions}")
    print(f"{'shape':<24}{'backend':<12}{'ms':>9}{'TFLOP/s':>9}")
    for name, (lq, lk) in shapes(args.tokens_per_frame).items():
        q = torch.randn(1, lq, args.heads, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, lk, args.heads, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        flops = 4 * lq * lk * args.heads * args.head_dim
        for backend in BACKENDS:
            try:
                attention(q, k, v, backend)
            except (AttentionBackendError, RuntimeError) as exc:
                print(f"{name:<24}{backend:<12}  unavailable: {str(exc).splitlines()[0][:60]}")
                continue
            ms = _time_ms(lambda: attention(q, k, v, backend), device, args.iters)
            print(f"{name:<24}{backend:<12}{ms:>9.2f}{flops / ms / 1e9:>9.1f}")

if __name__ == "__main__":
    main()
