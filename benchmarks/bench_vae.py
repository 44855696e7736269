"""Wan2.1 VAE decode: streaming (chunks of latent frames, cache in / cache out) vs whole-video, time and peak memory.

    python benchmarks/bench_vae.py --width 832 --height 480 --frames 81 --device cuda --dtype bf16
    python benchmarks/bench_vae.py --width 1920 --height 1088 --frames 81 --device cuda --dtype bf16 --tile 64
    python benchmarks/bench_vae.py --tiny                       # seconds on a CPU

Random weights at the real Wan2.1 config (the cost does not depend on the values); ``--tiny`` uses base_dim 16.
Each mode runs in its own fresh process, so its peak memory is its own. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), reported as the increase over the peak after building the model,
which includes allocator caching and is coarser than the CUDA figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from histream_core.vae import TiledDecoder, WanVAE, WanVAEConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _peak_cpu_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(opts: dict, mode: str, results: mp.Queue) -> None:
    """Build the VAE and decode random latents once per repeat in ``mode`` ('stream' or 'whole')."""
    torch.manual_seed(0)
    device, dtype = torch.device(opts["device"]), DTYPES[opts["dtype"]]
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    config = WanVAEConfig(base_dim=16) if opts["tiny"] else WanVAEConfig()
    vae = WanVAE(config).to(device=device, dtype=dtype).eval().set_channels_last(opts["channels_last"])
    vae.compile_norms(opts["compile_norms"]).set_conv_impl(opts["conv_impl"])
    torch.backends.cudnn.benchmark = opts["cudnn_benchmark"]
    decoder = TiledDecoder(vae, opts["tile"], opts["overlap"]) if opts["tile"] else vae
    t_lat = (opts["frames"] - 1) // config.temporal_factor + 1
    latents = torch.randn(1, config.z_dim, t_lat, opts["height"] // 8, opts["width"] // 8, device=device, dtype=dtype)
    chunk = opts["chunk"] if mode == "stream" else t_lat

    def decode() -> int:
        if mode == "whole":  # a whole-video decode holds all frames
            frames_out = decoder.decode_chunk(latents, decoder.initial_state())[0].shape[2]
        else:  # a stream hands each chunk on (decode_stream: the decoder owns and frees its caches)
            pieces = (latents[:, :, start:start + chunk] for start in range(0, t_lat, chunk))
            frames_out = sum(frames.shape[2] for frames in decoder.decode_stream(pieces))
        _sync(device)
        return frames_out

    for _ in range(opts["warmup"]):
        decode()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = _peak_cpu_mib()
    times = []
    for _ in range(opts["repeats"]):
        start = time.perf_counter()
        frames_out = decode()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_cpu_mib()
    results.put({"mode": mode, "seconds": min(times), "latent_frames": t_lat, "frames": frames_out,
                 "peak_mib": peak, "base_mib": base})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--frames", type=int, default=9, help="video frames, 1 + 4k (81 for Wan)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--tile", type=int, default=0, help="spatial tile size in latent pixels (0: no tiling)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in latent pixels")
    parser.add_argument("--chunk", type=int, default=3, help="latent frames per streaming chunk")
    parser.add_argument("--tiny", action="store_true", help="base_dim 16 instead of Wan's 96, for a quick run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the fastest is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--modes", default="stream,whole", help="comma-separated: stream (as the pipeline), whole")
    parser.add_argument("--channels-last", action="store_true", help="decode in channels-last layout")
    parser.add_argument("--conv-impl", default="auto", choices=["auto", "conv3d", "conv2d"],
                        help="how the causal convs run (WanVAE.set_conv_impl)")
    parser.add_argument("--compile-norms", action="store_true", help="fuse each norm + SiLU (WanVAE.compile_norms)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.frames < 1:
        parser.error(f"--frames must be 1 + 4k, got {args.frames}")
    if args.width % 8 or args.height % 8:
        parser.error("--width and --height must be multiples of 8")
    if not set(args.modes.split(",")) <= {"stream", "whole"}:
        parser.error(f"--modes takes stream and/or whole, got {args.modes!r}")
    if args.tile and not 0 <= args.overlap < args.tile:
        parser.error("--overlap must be in [0, --tile)")
    opts = vars(args) | {"warmup": args.warmup if args.warmup is not None else int(args.device.startswith("cuda"))}

    ctx = mp.get_context("spawn")
    rows = []
    for mode in args.modes.split(","):
        results = ctx.Queue()
        proc = ctx.Process(target=run_mode, args=(opts, mode, results))
        proc.start()
        rows.append(results.get())
        proc.join()

    device_name = (f"{torch.cuda.get_device_name(args.device)} (cuDNN {torch.backends.cudnn.version()})"
                   if args.device.startswith("cuda") else f"CPU ({args.threads or torch.get_num_threads()} threads)")
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else \
        "peak RSS (ru_maxrss), increase over the model-built baseline"
    print(f"Wan2.1 VAE decode, {'tiny (base_dim 16)' if args.tiny else 'real config (base_dim 96)'}, random weights, "
          f"{args.width}x{args.height}, {args.frames} frames, {args.dtype}, "
          f"{f'tiles {args.tile}/{args.overlap} latent px' if args.tile else 'untiled'}, "
          f"{'channels-last' if args.channels_last else 'NCDHW'}, "
          f"norms {'compiled' if args.compile_norms else 'eager'}, convs {args.conv_impl}, "
          f"cudnn.benchmark {args.cudnn_benchmark}, "
          f"on {device_name}, "
          f"torch {torch.__version__}")
    print(f"memory: {memory}; timing: best of {args.repeats} after {opts['warmup']} warm-up run(s)")
    print("| mode | latent frames / chunk | total s | ms / latent frame | ms / video frame | peak MiB | "
          "peak over baseline MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        per_chunk = args.chunk if row["mode"] == "stream" else row["latent_frames"]
        print(f"| {row['mode']} | {per_chunk} | {row['seconds']:.2f} | "
              f"{1000 * row['seconds'] / row['latent_frames']:.1f} | {1000 * row['seconds'] / row['frames']:.1f} | "
              f"{row['peak_mib']:.0f} | {row['peak_mib'] - row['base_mib']:.0f} |")


if __name__ == "__main__":
    main()
