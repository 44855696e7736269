"""The Wan VAE decoder's convolutions at their real shapes, in several exact formulations: which should it use?

The 81-frame decode at 1920x1088 is 1,434 TFLOP of convolutions (counted on the meta device), 84% of it in three
causal 3x3x3 conv3d shapes; cuDNN's conv3d ran the whole decode at 141 TFLOP/s on an H100 (18% of its bf16 matmul
rate). This script records every convolution of that decode (shapes and call counts, on the meta device), then
times the most expensive shapes in each formulation below and checks each against an fp32 ``F.conv3d``.

A causal 3x3x3 conv over padded frames x[0..T+1] (two past frames first) is ``out[t] = sum_k conv2d(x[t+k], w_k)``
with w_k = w[:, :, k]. The formulations (frames-major = [T, C, H, W], one frame per batch entry):

* ``conv3d``: what the VAE runs by default (NCDHW), and ``conv3d_cl``: the same in channels_last_3d, as
  ``WanVAE.set_channels_last()`` runs it.
* ``taps``: three conv2d over the frames-major frames, one per k, summed (K = 9C each).
* ``stacked``: per output frame one conv2d on x[t..t+2] read as 3C channels, a view in frames-major (K = 27C).
* ``stacked_all``: the same for all frames in one call, on an overlapping strided view.
* ``carry``: per new frame one conv2d with the three taps as 3*Cout output channels; the taps' partial sums for
  the next two frames are carried (the causal cache would hold them instead of the two past input frames).
``_cl`` variants keep channels_last (NHWC) tensors. Layout conversions done once before timing are not timed:
they would vanish if the whole decoder kept that layout; copies a formulation makes per call are timed.

    python benchmarks/bench_vae_conv.py                              # CUDA, 1920x1088, 81 frames, bf16
    python benchmarks/bench_vae_conv.py --device cpu --tiny --width 128 --height 64 --dtype fp32 --top 3
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histream_core.vae import WanVAE, WanVAEConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ConvCall = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # input shape, weight shape, padding
# A formulation builds, from NCDHW input / weight / bias, a function that runs it and one that turns its output
# back into NCDHW for the check.
Formulation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                       tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]


class _ConvRecorder(TorchDispatchMode):
    """Counts every aten.convolution by (input shape, weight shape, padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[ConvCall] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, weight, _, _, padding = args[:5]
            self.calls[(tuple(x.shape), tuple(weight.shape), tuple(padding))] += 1
        return func(*args, **(kwargs or {}))


def decode_conv_calls(config: WanVAEConfig, width: int, height: int, frames: int) -> collections.Counter[ConvCall]:
    """Every convolution of a streamed decode (one latent frame per pass, as the pipeline runs it), on meta."""
    with torch.device("meta"):
        vae = WanVAE(config).eval()
    t_latent = (frames - 1) // config.temporal_factor + 1
    latents = torch.zeros(1, config.z_dim, t_latent, height // 8, width // 8, device="meta")
    recorder = _ConvRecorder()
    with torch.no_grad(), recorder:
        for _ in vae.decode_stream(latents[:, :, i:i + 1] for i in range(t_latent)):
            pass
    return recorder.calls


def conv_flops(call: ConvCall) -> int:
    """Multiply-adds x 2 of one call (stride 1, the spatial padding keeps H and W)."""
    x_shape, w_shape, _ = call
    out_frames = x_shape[2] - w_shape[2] + 1 if len(x_shape) == 5 else 1
    pixels = x_shape[0] * out_frames * x_shape[-2] * x_shape[-1]
    return 2 * pixels * math.prod(w_shape)


# --- formulations of the causal 3x3x3 conv: x [1, C, T+2, H, W] (past frames included), w [Cout, C, 3, 3, 3] ---

def _frames_major(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    frames = x[0].transpose(0, 1).contiguous()  # [T+2, C, H, W]
    return frames.contiguous(memory_format=torch.channels_last) if channels_last else frames


def _from_frames_major(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(0, 1).unsqueeze(0)  # [T, Cout, H, W] -> [1, Cout, T, H, W]


def _conv3d(channels_last: bool) -> Formulation:
    def build(x, w, b):
        if channels_last:
            x, w = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w))
        return (lambda: F.conv3d(x, w, b, padding=(0, 1, 1))), (lambda out: out)
    return build


def _taps(channels_last: bool) -> Formulation:
    def build(x, w, b):
        frames = _frames_major(x, channels_last)
        taps = [w[:, :, k].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                for k in range(3)]
        t = frames.shape[0] - 2

        def run():
            out = F.conv2d(frames[0:t], taps[0], b, padding=1)
            out += F.conv2d(frames[1:t + 1], taps[1], padding=1)
            out += F.conv2d(frames[2:t + 2], taps[2], padding=1)
            return out
        return run, _from_frames_major
    return build


def _stacked_weight(w: torch.Tensor) -> torch.Tensor:
    """[Cout, C, 3, H, W] -> [Cout, 3*C, H, W] with channel index k*C + c, the order of frames x[t..t+2] stacked."""
    return w.permute(0, 2, 1, 3, 4).reshape(w.shape[0], 3 * w.shape[1], *w.shape[3:])


def _stacked(channels_last: bool) -> Formulation:
    def build(x, w, b):
        frames = _frames_major(x, channels_last)
        t_out, c, h, width = frames.shape[0] - 2, *frames.shape[1:]
        weight = _stacked_weight(w)
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)

        def window(t: int) -> torch.Tensor:  # frames t..t+2 as one image of 3C channels
            if channels_last:  # NHWC frames do not stack into channels without a copy
                return torch.cat([frames[t + k:t + k + 1] for k in range(3)], dim=1)
            return frames[t:t + 3].reshape(1, 3 * c, h, width)

        def run():
            out = frames.new_empty(t_out, w.shape[0], h, width)
            for t in range(t_out):
                out[t] = F.conv2d(window(t), weight, b, padding=1)[0]
            return out
        return run, _from_frames_major
    return build


def _stacked_all(x, w, b):
    frames = _frames_major(x, channels_last=False)
    t_out, c, h, width = frames.shape[0] - 2, *frames.shape[1:]
    windows = frames.as_strided((t_out, 3 * c, h, width), (c * h * width, h * width, width, 1))
    weight = _stacked_weight(w)
    return (lambda: F.conv2d(windows, weight, b, padding=1)), _from_frames_major


def _carry(channels_last: bool) -> Formulation:
    def build(x, w, b):
        frames = _frames_major(x, channels_last)
        c_out = w.shape[0]
        weight = torch.cat([w[:, :, k] for k in range(3)])  # [3*Cout, C, 3, 3]: output block k is tap k
        bias = torch.cat([torch.zeros_like(b), torch.zeros_like(b), b])  # on the block that completes an output
        if channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
        # What the cache would hold after the two past frames: their taps' contributions to the next two outputs.
        past = F.conv2d(frames[:2], weight, padding=1)
        carried = (past[1, c_out:2 * c_out] + past[0, :c_out], past[1, :c_out])

        def run():
            out = frames.new_empty(frames.shape[0] - 2, c_out, *frames.shape[2:])
            next_1, next_2 = carried
            for t in range(out.shape[0]):
                taps = F.conv2d(frames[t + 2:t + 3], weight, bias, padding=1)[0]
                torch.add(taps[2 * c_out:], next_1, out=out[t])
                next_1, next_2 = taps[c_out:2 * c_out] + next_2, taps[:c_out]
            return out
        return run, _from_frames_major
    return build


CAUSAL_3X3X3: dict[str, Formulation] = {
    "conv3d": _conv3d(False), "conv3d_cl": _conv3d(True),
    "taps": _taps(False), "taps_cl": _taps(True),
    "stacked": _stacked(False), "stacked_cl": _stacked(True), "stacked_all": _stacked_all,
    "carry": _carry(False), "carry_cl": _carry(True),
}


def _conv2d(channels_last: bool) -> Formulation:
    def build(x, w, b):
        if channels_last:
            x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
        return (lambda: F.conv2d(x, w, b, padding=w.shape[-1] // 2)), (lambda out: out)
    return build


def _native(x, w, b):
    """Any convolution as the VAE runs it: temporal padding already in x, the spatial one inside the conv."""
    if x.dim() == 5:
        return (lambda: F.conv3d(x, w, b, padding=(0, w.shape[3] // 2, w.shape[4] // 2))), (lambda out: out)
    return (lambda: F.conv2d(x, w, b, padding=w.shape[-1] // 2)), (lambda out: out)


CONV2D: dict[str, Formulation] = {"conv2d": _conv2d(False), "conv2d_cl": _conv2d(True)}
OTHER_CONV: dict[str, Formulation] = {"native": _native}


def formulations_for(call: ConvCall) -> dict[str, Formulation]:
    _, w_shape, _ = call
    if len(w_shape) == 5 and w_shape[2:] == (3, 3, 3):
        return CAUSAL_3X3X3
    if len(w_shape) == 4:
        return CONV2D
    return OTHER_CONV


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The convolution in fp32 (TF32 off), the yardstick of every formulation's error."""
    run, _ = _native(x.float(), w.float(), b.float())
    allow_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return run()
    finally:
        torch.backends.cudnn.allow_tf32 = allow_tf32


def _time_ms(run: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            start_s = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start_s))
    return statistics.median(times)


def random_operands(call: ConvCall, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Input, weight (scaled to keep the output O(1)) and bias of one conv call, made on the device."""
    x_shape, w_shape, _ = call
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(x_shape, generator=generator, device=device, dtype=dtype)
    w = torch.randn(w_shape, generator=generator, device=device, dtype=dtype) / math.prod(w_shape[1:]) ** 0.5
    return x, w, torch.randn(w_shape[0], generator=generator, device=device, dtype=dtype)


def measure(call: ConvCall, build: Formulation, operands: tuple[torch.Tensor, ...], expected: torch.Tensor,
            warmup: int, iters: int) -> dict:
    """Time one formulation of one conv call; its error against ``expected`` (fp32) and, on CUDA, the memory it
    needs beyond its operands."""
    device = expected.device
    run, to_ncdhw = build(*operands)
    got = to_ncdhw(run()).float()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    del got
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    ms = _time_ms(run, device, warmup, iters)
    extra_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": ms, "tflops": conv_flops(call) / ms / 1e9, "rel_error": error, "extra_gib": extra_gib}


NATIVE = ("conv3d", "conv2d", "native")  # how the VAE runs each convolution by default
EXACT = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative error of a right answer


def time_shape(call: ConvCall, count: int, device: torch.device, dtype: torch.dtype, benchmark_modes: list[bool],
               only: set[str], warmup: int, iters: int) -> list[dict]:
    """Rows for every chosen formulation of one shape (under each cudnn.benchmark setting); ms None when it ran
    out of memory."""
    operands = random_operands(call, device, dtype)
    expected = reference(*operands)
    rows = []
    for benchmark in benchmark_modes:
        torch.backends.cudnn.benchmark = benchmark
        for name, build in formulations_for(call).items():
            if only and name not in only and name not in NATIVE:
                continue
            try:
                row = measure(call, build, operands, expected, warmup, iters)
            except torch.OutOfMemoryError:
                row = {"ms": None}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row | {"formulation": name, "input": call[0], "weight": call[1], "calls": count,
                               "cudnn_benchmark": benchmark,
                               "decode_s": None if row["ms"] is None else row["ms"] * count / 1000,
                               "exact": row["ms"] is not None and row["rel_error"] < EXACT[dtype]})
    return rows



def _print_row(row: dict) -> None:
    cells = [list(row["input"]), list(row["weight"]), row["calls"], row["formulation"], row["cudnn_benchmark"]]
    if row["ms"] is None:
        cells += ["out of memory", "", "", "", ""]
    else:
        cells += [f"{row['ms']:.2f}", f"{row['tflops']:.3g}", f"{row['decode_s']:.2f}",
                  f"{row['rel_error']:.1e}{'' if row['exact'] else ' WRONG'}",
                  "-" if math.isnan(row["extra_gib"]) else f"{row['extra_gib']:.2f}"]
    print("| " + " | ".join(str(cell) for cell in cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=81, help="video frames, 1 + 4k (call counts for the table)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tiny", action="store_true", help="base_dim 16 instead of Wan's 96, for a quick run")
    parser.add_argument("--top", type=int, default=6, help="time the convolution shapes with the most FLOPs")
    parser.add_argument("--only", default="", help="comma-separated formulations to time besides today's")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off", "both"), default="both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if (args.frames - 1) % 4 or args.width % 8 or args.height % 8:
        parser.error("--frames must be 1 + 4k and --width / --height multiples of 8")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = WanVAEConfig(base_dim=16) if args.tiny else WanVAEConfig()
    calls = decode_conv_calls(config, args.width, args.height, args.frames)
    total = sum(conv_flops(call) * n for call, n in calls.items())
    ranked = sorted(calls, key=lambda call: -conv_flops(call) * calls[call])[:args.top]
    covered = sum(conv_flops(call) * calls[call] for call in ranked)
    benchmark_modes = {"on": [True], "off": [False], "both": [False, True]}[args.cudnn_benchmark]
    if device.type != "cuda":
        benchmark_modes = [False]  # a cuDNN setting

    device_name = (f"{torch.cuda.get_device_name(device)} (cuDNN {torch.backends.cudnn.version()})"
                   if device.type == "cuda" else "CPU")
    print(f"Wan VAE decode convolutions, {'tiny (base_dim 16)' if args.tiny else 'real config'}, {args.width}x"
          f"{args.height}, {args.frames} frames: {total / 1e12:.1f} TFLOP in {sum(calls.values())} calls; the "
          f"{len(ranked)} shapes below are {100 * covered / total:.0f}% of it. {args.dtype} on {device_name}, torch "
          f"{torch.__version__}; median of {args.iters} after {args.warmup} warm-up")
    print("| input [B,C,T,H,W] | weight | calls | formulation | cudnn.benchmark | ms/call | TFLOP/s | s in decode | "
          "rel. error | extra GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, today_s, best_s = [], 0.0, 0.0
    for call in ranked:
        shape_rows = time_shape(call, calls[call], device, dtype, benchmark_modes,
                                set(filter(None, args.only.split(","))), args.warmup, args.iters)
        for row in shape_rows:
            _print_row(row)
        rows += shape_rows
        today_s += next(r["decode_s"] or 0.0 for r in shape_rows if r["formulation"] in NATIVE)
        best_s += min((r["decode_s"] for r in shape_rows if r["exact"]), default=0.0)
    print(f"These shapes in the {args.frames}-frame decode: {today_s:.2f} s as the VAE runs them by default "
          f"(cudnn.benchmark {'off' if False in benchmark_modes else 'on'}), {best_s:.2f} s with the fastest exact "
          "formulation of each.")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "args": vars(args) | {"json": str(args.json)},
                                         "total_tflop": total / 1e12, "covered_fraction": covered / total,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
