"""Per-frame denoising latency, FLOPs, achieved TFLOP/s and peak memory of every mode, plus VAE decode and the
end-to-end time to an mp4. Random weights at the real config: compute cost does not depend on the weights.

    python benchmarks/bench_1080p.py                                   # 1.3B, 1920x1088, 81 frames, CUDA
    python benchmarks/bench_1080p.py --model tiny --device cpu --width 256 --height 256 --frames 17 --repeats 1

Latency: CUDA events around each chunk (wall clock on the CPU), warm-up runs excluded, median over repeats.
"Per-frame denoising latency" is the paper's metric: all denoising and cache passes of a video / its frames.
Prints one table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histream_core.config import MODEL_PRESETS  # noqa: E402
from histream_core.flops import H100_BF16_TFLOPS  # noqa: E402
from histream_core.model import BACKENDS, CausalWanModel  # noqa: E402
from histream_core.modes import MODES  # noqa: E402
from histream_core.timing import (Clock, ModeTiming, format_timings, peak_memory, reset_peak_memory,  # noqa: E402
                                  time_mode, time_video)

log = logging.getLogger("bench_1080p")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_model(name: str, device: torch.device, dtype: torch.dtype, compile_blocks: bool,
                compile_mode: str | None = None, fp8_matmul: bool = False) -> CausalWanModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(MODEL_PRESETS[name], compute_dtype=dtype)
    model = model.to(dtype).eval().requires_grad_(False)
    if fp8_matmul:
        model.use_fp8_matmul()
    return model.compile_blocks(compile_mode) if compile_blocks else model


def mode_config(args, mode: str):
    return MODES[mode].with_(attention_backend=args.attention, kv_cache_fp8=args.kv_cache_fp8)


def bench_mode(model, context, args, mode: str, device: torch.device) -> ModeTiming:
    return time_mode(model, context, mode, mode_config(args, mode), args.width, args.height, args.frames,
                     device=device, warmup=args.warmup, repeats=args.repeats, rate_tflops=args.rate)


def profile_mode(model, context, args, mode: str, device: torch.device) -> None:
    """Kernel time by kind (attention, GEMM, the rest) of one more video of ``mode``, on the graphs already compiled:
    where a missed target's time goes, for seconds instead of a profile_denoise.py run that compiles again."""
    from torch.profiler import ProfilerActivity, profile

    from kernel_table import print_kernel_table
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        time_video(model, context, args.width, args.height, args.frames, mode_config(args, mode), Clock(device))
    print_kernel_table(prof, f"profile of one {mode} video", args.frames, top=10, gpu=gpu)


def build_decoder(args, device: torch.device, dtype: torch.dtype, tiled: bool = True):
    """The VAE (random weights; a small one with the tiny DiT) or TAEHV's tiny decoder (--vae-kind taehv)."""
    from histream_core.vae import TiledDecoder, TinyWanDecoder, WanVAE, WanVAEConfig
    torch.manual_seed(0)
    with torch.device(device):
        if args.vae_kind == "taehv":
            return TinyWanDecoder().to(dtype).eval()
        vae = WanVAE(WanVAEConfig() if args.model != "tiny" else WanVAEConfig(base_dim=8)).to(dtype).eval()
    vae.set_channels_last(args.vae_channels_last).compile_norms(args.vae_compile).set_conv_impl(args.vae_conv_impl)
    return TiledDecoder.overlapping_by_a_quarter(vae, args.tile) if args.tile and tiled else vae


def bench_vae(args, device: torch.device, dtype: torch.dtype, clock: Clock) -> dict:
    decoder = build_decoder(args, device, dtype)
    latent_frames = (args.frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, args.height // 8, args.width // 8, device=device, dtype=dtype)
    results = {}
    for name in ("whole", "streamed"):
        reset_peak_memory(device)
        start = clock.mark()
        if name == "whole":
            decoder.decode(latents)
        else:  # as the pipeline: chunks of 3 latent frames through one stream that owns its caches
            for _ in decoder.decode_stream(latents[:, :, first:first + 3] for first in range(0, latent_frames, 3)):
                pass
        results[name] = {"s": clock.seconds(start, clock.mark()), **peak_memory(device)}
    return results


def bench_end_to_end(model, context, args, device: torch.device, dtype: torch.dtype, mode: str, order: str) -> dict:
    from histream_core.pipeline import generate_to_file
    vae = build_decoder(args, device, dtype, tiled=False)  # generate_to_file tiles it itself
    reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = generate_to_file(model, vae, context, Path(folder) / "bench.mp4", args.width, args.height,
                                  args.frames, mode_config(args, mode), seed=0, tile=args.tile, order=order)
        seconds = time.perf_counter() - start
    return {"mode": mode, "order": order, "tile": args.tile, "s": seconds, "denoise_s": report.denoise_s,
            "decode_s": report.decode_s, **peak_memory(device)}


def predicted_memory(args, dtype: torch.dtype, mode: str) -> dict:
    """The meta-device prediction (histream_core.memory) of the same request, to hold against the measured peaks."""
    from histream_core.memory import predict_memory
    from histream_core.vae import WanVAEConfig
    vae = WanVAEConfig() if args.model != "tiny" else WanVAEConfig(base_dim=8)
    return predict_memory(MODEL_PRESETS[args.model], vae, args.width, args.height, args.frames,
                          mode_config(args, mode), dtype, tile=args.tile, fp8_matmul=args.fp8_matmul).as_dict()


def print_table(args, rows: list[ModeTiming], vae: dict | None, e2e: list[dict], predicted: dict | None,
                device_name: str) -> None:
    compiled = f", compiled ({args.compile_mode or 'default mode'})" if args.compile else ""
    print(f"{args.model}, {args.width}x{args.height}, {args.frames} frames, {args.dtype}, {args.attention}{compiled}"
          f"{', VAE channels-last' if args.vae_channels_last else ''}"
          f"{', VAE norms compiled' if args.vae_compile else ''}, VAE convs {args.vae_conv_impl}"
          f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}, {device_name}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(format_timings(rows))
    if vae and "error" in vae:
        print(f"VAE decode failed: {vae['error']}")
    elif vae:
        for name, v in vae.items():
            print(f"{'VAE' if args.vae_kind == 'wan' else 'TAEHV'} decode {args.frames} frames "
                  f"({name}{f', tiles {args.tile}' if args.tile else ''}): "
                  f"{v['s']:.2f} s{_peak_text(v)}")
    for run in e2e:
        if "error" in run:
            print(f"end to end to mp4 ({run['mode']}, decode {run['order']}) failed: {run['error']}")
            continue
        rest = run["s"] - run["denoise_s"] - run["decode_s"]
        print(f"end to end to mp4 ({run['mode']}, decode {run['order']}): {run['s']:.2f} s (denoise "
              f"{run['denoise_s']:.2f} s, decode {run['decode_s']:.2f} s, rest {rest:.2f} s){_peak_text(run)}")
    if e2e:
        print("rest: mostly waiting for the H.264 encoder. Random weights decode to noise, which x264 encodes slower "
              "than real video (1080p, crf 19: 3.4 fps for noise, 12.6 for a smooth synthetic video on a 2-core CPU)")
    if predicted and "error" in predicted:
        print(f"memory prediction failed: {predicted['error']}")
    elif predicted:
        print("predicted peaks (meta device, live tensors, GiB): "
              + ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in predicted.items() if k.endswith("_gib")))


def _attempt(measure, **labels) -> dict:
    """The measurement, or what went wrong with it: a failing part (an untried decode order, out of memory) must
    not cost the figures of the others in a scarce GPU call."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        log.exception("measurement failed")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**labels, "error": f"{type(exc).__name__}: {exc}"}


def _measured(what: str, result: dict) -> dict:
    """Print a result as soon as it exists (a GPU call that times out keeps what it printed), then hand it on."""
    print(f"measured: {what}", json.dumps(result), flush=True)
    return result


def _peak_text(run: dict) -> str:
    if run["peak_gib"] is None:
        return ""
    return f", peak {run['peak_gib']:.2f} GiB allocated / {run['reserved_gib']:.2f} GiB reserved"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-1.3b", choices=list(MODEL_PRESETS))
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rate", type=float, default=H100_BF16_TFLOPS, help="matmul TFLOP/s that defines the floor")
    parser.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the blocks, e.g. max-autotune-no-cudagraphs (GEMM autotuning)")
    parser.add_argument("--tile", type=int, help="end-to-end run: decode in spatial tiles of this many latent px")
    parser.add_argument("--attention", default="sdpa", choices=list(BACKENDS))
    parser.add_argument("--kv-cache-fp8", action="store_true", help="store the K/V caches in fp8")
    parser.add_argument("--fp8-matmul", action="store_true",
                        help="the blocks multiply in fp8 (CausalWanModel.use_fp8_matmul; bf16, also on the CPU)")
    parser.add_argument("--skip-vae", action="store_true")
    parser.add_argument("--vae-kind", default="wan", choices=["wan", "taehv"],
                        help="decode with the Wan VAE or TAEHV's tiny decoder (random weights either way)")
    parser.add_argument("--vae-channels-last", action="store_true",
                        help="decode with the Wan VAE in channels-last layout (WanVAE.set_channels_last)")
    parser.add_argument("--vae-compile", action="store_true",
                        help="fuse the Wan VAE decoder's norm + SiLU steps with torch.compile (WanVAE.compile_norms)")
    parser.add_argument("--vae-conv-impl", default="auto", choices=["auto", "conv3d", "conv2d"],
                        help="how the Wan VAE's causal convs run (WanVAE.set_conv_impl)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms (torch.backends.cudnn.benchmark)")
    parser.add_argument("--e2e-mode", default="histream+", help="mode of the end-to-end mp4 run ('' to skip)")
    parser.add_argument("--e2e-orders", default="after,interleaved,overlapped",
                        help="decode orders of the end-to-end runs")
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, the kernel time by kind of one more video of the first mode")
    parser.add_argument("--predict-memory", action="store_true",
                        help="also print the meta-device memory prediction of the end-to-end mode")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    # CPU runs are fp32 smoke tests, except the fp8 matmul, which computes in bf16 only
    dtype = DTYPES[args.dtype] if device.type == "cuda" or args.dtype == "fp32" or args.fp8_matmul else torch.float32
    args.dtype = next(name for name, value in DTYPES.items() if value == dtype)  # what ran, for the table and JSON
    clock = Clock(device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    model = build_model(args.model, device, dtype, args.compile, args.compile_mode, args.fp8_matmul)
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, device=device)
    with torch.no_grad():
        rows = []
        for mode in filter(None, args.modes.split(",")):
            rows.append(bench_mode(model, context, args, mode, device))
            print("measured:", format_timings(rows[-1:]).splitlines()[-1], flush=True)  # kept if the call times out
        if args.profile and rows:
            _attempt(lambda: profile_mode(model, context, args, rows[0].mode, device))
        vae = None if args.skip_vae else _measured("VAE decode", _attempt(lambda: bench_vae(args, device, dtype,
                                                                                             clock)))
        e2e = [_measured("end to end", _attempt(lambda order=order: bench_end_to_end(
                   model, context, args, device, dtype, args.e2e_mode, order), mode=args.e2e_mode, order=order))
               for order in args.e2e_orders.split(",") if order and args.e2e_mode]
    predicted = (_attempt(lambda: predicted_memory(args, dtype, args.e2e_mode or "histream"))
                 if args.predict_memory else None)
    device_name = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                   f"cuDNN {torch.backends.cudnn.version()}" if device.type == "cuda" else "CPU")
    print_table(args, rows, vae, e2e, predicted, device_name)
    if args.json:
        results = {"device": device_name, "args": vars(args), "modes": [r.as_dict() for r in rows], "vae": vae,
                   "end_to_end": e2e, "predicted_memory": predicted}
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
