"""Per-frame denoising latency of a run, the paper's metric: all denoising and cache passes of a video / its frames.

``time_mode`` runs a video with warm-up runs excluded and reports the median of repeats, per chunk too (flat once
the window is full), with the run's exact FLOPs, the achieved TFLOP/s and the peak GPU memory. CUDA events time
a GPU, the wall clock a CPU. Used by the CLI's ``bench`` and by benchmarks/bench_1080p.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .config import SamplerConfig
from .flops import H100_BF16_TFLOPS, flop_unit, run_flops
from .memory import GIB
from .sampler import stream_video


class Clock:
    """CUDA events on a GPU (no sync inside the timed work), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, stop) -> float:
        if self.cuda:
            stop.synchronize()
            return start.elapsed_time(stop) / 1000.0
        return stop - start


def peak_memory(device: torch.device) -> dict:
    """Peak bytes the tensors held (allocated) and the allocator held (reserved, nearer to nvidia-smi), in GiB."""
    if device.type != "cuda":
        return {"peak_gib": None, "reserved_gib": None}
    return {"peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_video(model, text, width: int, height: int, frames: int, cfg: SamplerConfig, clock: Clock,
               seed: int = 0) -> list[float]:
    """Seconds per chunk of one video (denoising and cache passes; no decode)."""
    seconds, chunks = [], stream_video(model, text, width, height, frames, cfg, seed=seed)
    while True:
        start = clock.mark()
        try:
            next(chunks)
        except StopIteration:
            return seconds
        seconds.append(clock.seconds(start, clock.mark()))


@dataclass(frozen=True)
class ModeTiming:
    mode: str
    s_per_frame: float
    total_s: float
    tflop_total: float
    achieved_tflops: float
    floor_fraction: float      # the mode's FLOPs at the reference matmul rate / the measured time
    model_calls: int
    chunk_s: list[float]       # the median run's chunks
    drift: float | None        # last chunk but one / chunk 3 - 1 (see chunk_drift; goal: within 5%)
    peak_gib: float | None     # CUDA only
    reserved_gib: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def time_mode(model, text, name: str, cfg: SamplerConfig, width: int, height: int, frames: int, *,
              device: torch.device, warmup: int = 1, repeats: int = 3,
              rate_tflops: float = H100_BF16_TFLOPS) -> ModeTiming:
    """Median of ``repeats`` videos after ``warmup`` untimed ones (compilation, cuDNN autotuning)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    clock = Clock(device)
    for _ in range(warmup):
        time_video(model, text, width, height, frames, cfg, clock)
    reset_peak_memory(device)
    runs = [time_video(model, text, width, height, frames, cfg, clock) for _ in range(repeats)]
    totals = [sum(run) for run in runs]
    seconds = statistics.median(totals)
    median_run = runs[totals.index(statistics.median_low(totals))]
    flops = run_flops(model.cfg, cfg, width, height, frames, name)
    return ModeTiming(
        mode=name, s_per_frame=seconds / frames, total_s=seconds, tflop_total=flops.tflop_total,
        achieved_tflops=flops.tflop_total / seconds,
        floor_fraction=(flops.tflop_per_frame / rate_tflops) / (seconds / frames), model_calls=flops.model_calls,
        chunk_s=median_run, drift=chunk_drift(median_run), **peak_memory(device))


def chunk_drift(chunk_s: list[float]) -> float | None:
    """How much slower the last chunk but one ran than chunk 3, the first with the window full (None for videos of
    fewer than five chunks). The last chunk is not comparable: it writes no cache, and it may be short. For 601
    frames the chunk compared is chunk 50, as in the goal "chunk 50 within 5% of chunk 3"."""
    return chunk_s[-2] / chunk_s[2] - 1 if len(chunk_s) >= 5 else None


def format_timings(rows: list[ModeTiming]) -> str:
    """Plain-text table; small runs (the tiny model) in GFLOP or MFLOP and a floor fraction below 1% with its
    digits, so no column reads 0."""
    unit, scale, _ = flop_unit(max(r.tflop_total for r in rows))
    header = (f"{'mode':<14}{'s/frame':>9}{unit:>9}{unit + '/s':>10}{'of floor':>10}{'calls':>7}{'peak GiB':>10}"
              f"{'drift':>8}  per-chunk s")
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = f"{r.peak_gib:.2f}" if r.peak_gib is not None else "-"
        drift = f"{r.drift:+.1%}" if r.drift is not None else "-"
        floor = f"{r.floor_fraction:.0%}" if r.floor_fraction >= 0.01 else f"{100 * r.floor_fraction:.2g}%"
        lines.append(f"{r.mode:<14}{r.s_per_frame:>9.4f}{scale * r.tflop_total:>9,.1f}"
                     f"{scale * r.achieved_tflops:>10,.1f}{floor:>10}{r.model_calls:>7}{peak:>10}{drift:>8}  "
                     + " ".join(f"{s:.3f}" for s in r.chunk_s))
    return "\n".join(lines)


__all__ = ["Clock", "peak_memory", "reset_peak_memory", "time_video", "ModeTiming", "time_mode", "format_timings"]
