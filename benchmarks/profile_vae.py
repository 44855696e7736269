"""Where the Wan VAE decode's time goes: a torch.profiler trace of one streamed 81-frame decode (chunks of 3 latent
frames, as the pipeline runs it), kernels grouped into convolution, copies, norms/elementwise, upsampling and other.
Random weights at the real config. Says what is left beside the convolutions (see bench_vae_conv.py).

    python benchmarks/profile_vae.py [--channels-last] [--compile-norms] [--cudnn-benchmark]     # CUDA
    python benchmarks/profile_vae.py --device cpu --tiny --width 128 --height 64 --frames 9     # smoke test (CPU ops)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_table import print_kernel_table  # noqa: E402
from histream_core.vae import WanVAE, WanVAEConfig  # noqa: E402

# cuDNN's conv kernels are named cudnn/xmma/implicit-gemm "fprop": match them before anything else
CATEGORIES = (
    ("conv", ("conv", "fprop", "implicit", "xmma")),  # on the CPU: aten::convolution, mkldnn_convolution
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "matmul", "cutlass", "nvjet", "cublas")),
    ("upsample", ("upsample", "nearest")),
    ("copy/cat/fill", ("copy", "cat", "memcpy", "memset", "fill")),
    ("norm/elementwise", ("elementwise", "vectorized", "reduce", "norm", "triton", "silu", "mul", "add", "div")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile-norms", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--conv-impl", default="auto", choices=["auto", "conv3d", "conv2d"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="base_dim 16 instead of Wan's 96, for a quick run")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    with torch.device(device):
        vae = WanVAE(WanVAEConfig(base_dim=16) if args.tiny else WanVAEConfig()).to(torch.bfloat16).eval()
    vae.set_channels_last(args.channels_last).compile_norms(args.compile_norms).set_conv_impl(args.conv_impl)
    latent_frames = (args.frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, args.height // 8, args.width // 8, device=device, dtype=torch.bfloat16)

    def decode() -> None:
        for _ in vae.decode_stream(latents[:, :, first:first + 3] for first in range(0, latent_frames, 3)):
            pass

    decode()  # warm-up: cuDNN algorithm choice, compilation
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        decode()
        if gpu:
            torch.cuda.synchronize(device)
    options = [name for name, on in (("channels-last", args.channels_last), ("norms compiled", args.compile_norms),
                                     ("cudnn.benchmark", args.cudnn_benchmark),
                                     (f"convs {args.conv_impl}", True)) if on]
    versions = f"torch {torch.__version__}" + (f", cuDNN {torch.backends.cudnn.version()}" if gpu else "")
    print_kernel_table(prof, f"Wan VAE decode {args.width}x{args.height}x{args.frames}, bf16, {versions}"
                       f"{''.join(', ' + o for o in options)}", args.frames, args.top, CATEGORIES, gpu)


if __name__ == "__main__":
    main()
