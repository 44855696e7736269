"""Exact matmul FLOPs of a HiStream run, from the model config and the sampler's plan (no weights, no memory).

Counted: every matrix multiply of the DiT, 2 FLOPs per multiply-add: patch embedding, timestep MLPs, per block the
self-attention projections, attention scores and weighted sum over the visible keys (the chunk plus its cache),
cross-attention on the text, FFN, and the output head (a cache pass stops at the last block's K/V); plus once per
video the text embedding and every block's cross-attention text K/V (computed once and reused). Element-wise work
(norms, RoPE, modulation, softmax) is not a matmul and is left out, as ``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, SamplerConfig
from .modes import MODES
from .sampler import ModelCall, plan_video, video_geometry

H100_BF16_TFLOPS = 798.0  # a bf16 8192^3 matmul on the lent H100 (benchmarks/NOTES.md): the floors' rate


def call_flops(cfg: ModelConfig, call: ModelCall, batch: int = 1) -> int:
    """FLOPs of one forward over ``call.num_frames`` frames with ``call.cached_frames`` cached frames."""
    pt, ph, pw = cfg.patch_size
    tokens_per_frame = (call.latent_hw[0] // ph) * (call.latent_hw[1] // pw)
    frames = call.num_frames // pt
    q_len = frames * tokens_per_frame
    k_len = q_len + call.cached_frames * tokens_per_frame
    d, ffn = cfg.dim, cfg.ffn_dim
    per_block = (
        4 * q_len * d * d            # self-attention q, k, v, o
        + 2 * q_len * k_len * d      # scores and weighted sum over the visible keys
        + 2 * q_len * d * d          # cross-attention q, o
        + 2 * q_len * cfg.text_len * d
        + 2 * q_len * d * ffn        # FFN up and down
    )
    if call.writes_only:  # the last block computes only its k and v; no head (CausalWanModel.write_cache)
        blocks_and_head = (cfg.num_layers - 1) * per_block + 2 * q_len * d * d
    else:
        blocks_and_head = cfg.num_layers * per_block + q_len * d * cfg.out_dim * pt * ph * pw
    macs = (
        q_len * cfg.in_dim * pt * ph * pw * d                             # patch embedding
        + frames * (cfg.freq_dim * d + d * d + d * 6 * d)                 # time embedding + projection, per frame
        + blocks_and_head
    )
    return 2 * batch * macs


def text_flops(cfg: ModelConfig, batch: int = 1) -> int:
    """Once per video: text embedding MLP and every block's cross-attention K/V of the text."""
    embedding = cfg.text_len * (cfg.text_dim * cfg.dim + cfg.dim * cfg.dim)
    macs = embedding + cfg.num_layers * 2 * cfg.text_len * cfg.dim ** 2
    return 2 * batch * macs


@dataclass(frozen=True)
class RunFlops:
    mode: str
    flops_total: int
    model_calls: int
    frames: int
    per_chunk: tuple[int, ...]

    @property
    def tflop_total(self) -> float:
        return self.flops_total / 1e12

    @property
    def tflop_per_frame(self) -> float:
        return self.tflop_total / self.frames

    def as_dict(self) -> dict:
        return {"tflop_total": self.tflop_total, "tflop_per_frame": self.tflop_per_frame,
                "model_calls": self.model_calls, "frames": self.frames,
                "tflop_per_chunk": [f / 1e12 for f in self.per_chunk]}


def run_flops(model_cfg: ModelConfig, sampler_cfg: SamplerConfig, width: int, height: int, frames: int,
              mode: str = "custom", batch: int = 1, prompt_switches: frozenset[int] = frozenset()) -> RunFlops:
    """FLOPs of a run; ``prompt_switches``: chunks where a prompt schedule changes prompt (their recache passes)."""
    geometry = video_geometry(width, height, frames, sampler_cfg, model_cfg.patch_size[1])
    per_chunk = []
    calls = 0
    for plan in plan_video(geometry, sampler_cfg, prompt_switches):
        chunk_calls = plan.calls(geometry, sampler_cfg.drc)
        calls += len(chunk_calls)
        per_chunk.append(sum(call_flops(model_cfg, c, batch) for c in chunk_calls))
    total = sum(per_chunk) + (1 + len(prompt_switches)) * text_flops(model_cfg, batch)
    return RunFlops(mode, total, calls, frames, tuple(per_chunk))


def flops_table(model_cfg: ModelConfig, width: int, height: int, frames: int,
                modes: dict[str, SamplerConfig] | None = None) -> list[RunFlops]:
    return [run_flops(model_cfg, cfg, width, height, frames, name) for name, cfg in (modes or MODES).items()]


def flop_unit(largest_tflop: float) -> tuple[str, float, str]:
    """The unit a table shows FLOPs in, so that small runs (the tiny model) do not read 0.0: (TFLOP, GFLOP or MFLOP,
    the factor from TFLOP to it, the time unit of its floor at a TFLOP/s rate: ms, us or ns)."""
    return next((u, k, t) for u, k, t in (("TFLOP", 1.0, "ms"), ("GFLOP", 1e3, "us"), ("MFLOP", 1e6, "ns"))
                if largest_tflop * k >= 1 or u == "MFLOP")


def format_table(rows: list[RunFlops], rate_tflops: float | None = None) -> str:
    """Plain-text table; with a matmul rate (TFLOP/s) it adds the compute floor per frame (see :func:`flop_unit`)."""
    unit, scale, floor_unit = flop_unit(max(r.tflop_total for r in rows))
    floor_scale = 1e3 * scale
    header = f"{'mode':<14}{'model calls':>12}{unit + ' total':>14}{unit + '/frame':>13}"
    if rate_tflops:
        header += f"{f'floor {floor_unit}/frame':>16}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r.mode:<14}{r.model_calls:>12}{scale * r.tflop_total:>14,.1f}"
                f"{scale * r.tflop_per_frame:>13,.2f}")
        if rate_tflops:
            line += f"{floor_scale * r.tflop_per_frame / rate_tflops:>16,.1f}"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["H100_BF16_TFLOPS", "flop_unit", "call_flops", "text_flops", "RunFlops", "run_flops", "flops_table",
           "format_table"]
