"""Attention kernels at HiStream's shapes: TFLOP/s of each backend behind histream_core's one attention function.

    python benchmarks/bench_attention.py   # CUDA; 1.3B heads, 1080p chunk (3 frames) against 3 cached frames
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histream_core.model.attention import BACKENDS, AttentionBackendError, attention  # noqa: E402

SHAPES = {  # name: (query tokens, key tokens)
    "1080p chunk, 3 cached": (3 * 8160, 6 * 8160),
    "1080p chunk, no cache": (3 * 8160, 3 * 8160),
    "540p chunk, 3 cached": (3 * 2040, 6 * 2040),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{'shape':<24}{'backend':<12}{'ms':>9}{'TFLOP/s':>9}")
    for name, (lq, lk) in SHAPES.items():
        q = torch.randn(1, lq, args.heads, args.head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, lk, args.heads, args.head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * lq * lk * args.heads * args.head_dim
        for backend in BACKENDS:
            try:
                attention(q, k, v, backend)
            except (AttentionBackendError, RuntimeError) as exc:
                print(f"{name:<24}{backend:<12}  unavailable: {str(exc).splitlines()[0][:60]}")
                continue
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                attention(q, k, v, backend)
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop) / args.iters
            print(f"{name:<24}{backend:<12}{ms:>9.2f}{flops / ms / 1e9:>9.1f}")


if __name__ == "__main__":
    main()
