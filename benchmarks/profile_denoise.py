"""Where the denoising time goes: a torch.profiler trace of one video, kernels grouped into attention, GEMM,
elementwise/normalisation and other, for one mode. Prints a table.

    python benchmarks/profile_denoise.py --mode histream+ [--attention sdpa_cudnn] [--compile]
    python benchmarks/profile_denoise.py --model tiny --device cpu --width 128 --height 128 --frames 17  # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_1080p import build_model, mode_config  # noqa: E402
from kernel_table import print_kernel_table  # noqa: E402
from histream_core.model import BACKENDS  # noqa: E402
from histream_core.sampler import stream_video  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="histream+")
    parser.add_argument("--model", default="wan2.1-1.3b")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--attention", default="sdpa", choices=list(BACKENDS))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--kv-cache-fp8", action="store_true", help="store the K/V caches in fp8")
    parser.add_argument("--fp8-matmul", action="store_true", help="the blocks multiply in fp8 (bf16, also on a CPU)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test (CPU op times, fp32)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu or args.fp8_matmul else torch.float32
    model = build_model(args.model, device, dtype, args.compile, fp8_matmul=args.fp8_matmul)
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, device=device)
    cfg = mode_config(args, args.mode)
    with torch.no_grad():
        list(stream_video(model, context, args.width, args.height, args.frames, cfg, 0))  # warm-up
        with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
            list(stream_video(model, context, args.width, args.height, args.frames, cfg, 0))
            if gpu:
                torch.cuda.synchronize(device)
    switches = f"{', compiled' if args.compile else ''}{', fp8 matmul' if args.fp8_matmul else ''}"
    print_kernel_table(prof, f"{args.mode}, {args.width}x{args.height}x{args.frames}, {args.attention}{switches}",
                       args.frames, args.top, gpu=gpu)


if __name__ == "__main__":
    main()
