"""Named modes: presets over the switches of ``SamplerConfig`` (so the paper's ablations are configurations).

| mode         | DRC | AGSW | steps chunk 1 (low+high) | later chunks | HD tech |
|--------------|-----|------|--------------------------|--------------|---------|
| histream     | on  | on   | 2 + 2                    | 2 + 2        | on      |
| histream+    | on  | on   | 2 + 2                    | 1 + 1        | on      |
| self-forcing | off | off  | 0 + 4                    | 0 + 4        | off     |
| no-drc       | off | on   | 0 + 4                    | 0 + 4        | on      |
| no-agsw      | on  | off  | 2 + 2                    | 2 + 2        | on      |
| two-step     | on  | on   | 1 + 1                    | 1 + 1        | on      |
| no-hd        | on  | on   | 2 + 2                    | 2 + 2        | tuning's|

HiStream+'s later chunks run base steps 1000 (low) and 500 (high): warped at shift 7 that is t = 1000 then 875, the
same noise level at which chunk 1 hands its upsampled x0 to the high-resolution steps. So the low step still starts
from pure noise as the model was trained to, the high step refines from the level the high phase always starts
at, and the pair equals the generator's own 2-step list [1000, 500], a point on its trained trajectory.
"self-forcing" is the Self-Forcing sampler unchanged (shift 5, plain RoPE and attention) at the target resolution.
"no-hd" is the paper's "w/o HD Tech" ablation as we read it: HiStream with every inference-time HD adjustment undone,
which Appendix A.2 lists as increments over the tuning settings (shift 5 -> 7, NTK factor 2 -> 5, attention scaling
2 on chunk 1): so shift 5, NTK factor 2 at both resolutions (the tuned weights' own), no attention scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType

from .config import ChunkSteps, HDConfig, SamplerConfig, StreamConfig
FOUR_STEPS_FULL_RES = ChunkSteps(low=(), high=(1000.0, 750.0, 500.0, 250.0))
TWO_STEPS_DRC = ChunkSteps(low=(1000.0,), high=(500.0,))

MODES: Mapping[str, SamplerConfig] = MappingProxyType({  # read-only: a change would reach every caller
    "histream": SamplerConfig(),
    "histream+": SamplerConfig(later_chunks=TWO_STEPS_DRC),
    "self-forcing": SamplerConfig(drc=False, stream=StreamConfig(window=False), shift=5.0,
                                  first_chunk=FOUR_STEPS_FULL_RES, later_chunks=FOUR_STEPS_FULL_RES,
                                  hd=HDConfig(enabled=False)),
    "no-drc": SamplerConfig(drc=False, first_chunk=FOUR_STEPS_FULL_RES, later_chunks=FOUR_STEPS_FULL_RES),
    "no-agsw": SamplerConfig(stream=StreamConfig(window=False)),
    "two-step": SamplerConfig(first_chunk=TWO_STEPS_DRC, later_chunks=TWO_STEPS_DRC),
    "no-hd": SamplerConfig(shift=5.0, hd=HDConfig(rope_factors_high=(1.0, 2.0, 2.0), first_chunk_attn_coef=1.0)),
})


def mode_config(name: str) -> SamplerConfig:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None


# -- knobs: the readings of the paper a user may change on top of a mode (the node's inputs, the CLI's flags) --------
FLOAT_KNOBS = ("low_res_scale", "shift", "ntk_factor_high", "ntk_factor_low", "first_chunk_attn_coef")
STEP_KNOBS = ("first_chunk_steps", "later_chunk_steps")
KNOBS = FLOAT_KNOBS + STEP_KNOBS
UNUSED_BECAUSE = {
    "low_res_scale": "it denoises every step at full resolution (no dual-resolution caching)",
    "ntk_factor_low": "it runs without low-resolution passes or without HD tech",
    "ntk_factor_high": "it runs without HD tech (plain RoPE and attention)",
    "first_chunk_attn_coef": "it runs without HD tech (plain RoPE and attention)",
}
# Each number knob's range: beyond it the run degenerates without failing (a shift of 1e308 puts every step at
# t = 1000, a scale of 1e-9 makes a 0x0 low-res pass, an attention coefficient below 1/N0 flips the logits' sign)
KNOB_RANGES = {"low_res_scale": (0.1, 1.0), "shift": (0.1, 100.0), "ntk_factor_high": (0.1, 100.0),
               "ntk_factor_low": (0.1, 100.0), "first_chunk_attn_coef": (0.1, 100.0)}
STEPS_EXAMPLE = "'1000,750|500,250' (low-res steps | high-res steps) or '1000,750,500,250' (full resolution only)"


class KnobError(ValueError):
    """A knob value a mode cannot take; ``knob`` names it (the node input or CLI flag to fix)."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(message)
        self.knob = knob


def format_steps(steps: ChunkSteps) -> str:
    """ChunkSteps as a knob string: "low|high", or just "high" when the chunk has no low-res steps."""
    def numbers(ts):
        return ",".join(f"{t:g}" for t in ts)

    return f"{numbers(steps.low)}|{numbers(steps.high)}" if steps.low else numbers(steps.high)


def parse_steps(knob: str, text: str) -> ChunkSteps:
    """A knob string ("1000,750|500,250", or "1000,750,500,250" at full resolution only) as ChunkSteps."""
    low_text, _, high_text = text.strip().rpartition("|")
    try:
        low, high = (_numbers(part) for part in (low_text, high_text))
        return ChunkSteps(low=low, high=high)
    except ValueError as exc:
        raise KnobError(knob, f"cannot use {text!r} ({exc}); write base timesteps (0, 1000] from noise to clean, "
                        f"e.g. {STEPS_EXAMPLE}") from None


def _numbers(text: str) -> tuple[float, ...]:
    """'1000,750' -> (1000.0, 750.0); an empty list is (), and one trailing comma is allowed, but an empty item
    inside (1000,,750: a deleted number) is an error."""
    items = [item.strip() for item in text.strip().removesuffix(",").split(",")] if text.strip() else []
    if "" in items:
        raise ValueError("an empty item between commas")
    return tuple(float(item) for item in items)


def knob_values(cfg: SamplerConfig) -> dict[str, float | str | None]:
    """Each knob's value under ``cfg``, or None where the configuration does not use it."""
    hd, drc = cfg.hd.enabled, cfg.drc
    return {
        "low_res_scale": cfg.low_res_scale if drc else None,
        "shift": cfg.shift,
        "ntk_factor_high": cfg.hd.rope_factors_high[1] if hd else None,
        "ntk_factor_low": cfg.hd.rope_factors_low[1] if hd and drc else None,
        "first_chunk_attn_coef": cfg.hd.first_chunk_attn_coef if hd else None,
        "first_chunk_steps": format_steps(cfg.first_chunk),
        "later_chunk_steps": format_steps(cfg.later_chunks),
    }


def with_knobs(mode: str, **knobs: float | str) -> SamplerConfig:
    """Mode ``mode``'s configuration with the given knobs changed (see KNOBS).

    NTK factors apply to both spatial axes (time is never scaled). Raises KnobError naming the knob: unknown, not used
    by the mode, out of range, or steps the mode cannot run."""
    cfg = mode_config(mode)
    current = knob_values(cfg)
    for knob, value in knobs.items():
        if knob not in KNOBS:
            raise KnobError(knob, f"unknown knob {knob!r}; the knobs are {', '.join(KNOBS)}")
        if current[knob] is None:
            raise KnobError(knob, f"mode '{mode}' does not use it ({UNUSED_BECAUSE[knob]}); leave it at the mode's "
                            "value or pick a mode that uses it")
    for knob in FLOAT_KNOBS:
        if knob in knobs:
            value, (low, high) = knobs[knob], KNOB_RANGES[knob]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise KnobError(knob, f"{value!r} is not a number (the mode's value is {current[knob]:g})")
            if not low <= value <= high:  # NaN too
                raise KnobError(knob, f"{value:g} is out of range: use a number in [{low:g}, {high:g}] (the mode's "
                                f"value is {current[knob]:g})")
    steps = {knob: parse_steps(knob, knobs[knob]) for knob in STEP_KNOBS if knob in knobs}
    for knob, parsed in steps.items():
        if parsed.low and not cfg.drc:
            raise KnobError(knob, f"mode '{mode}' has no low-resolution steps (dual-resolution caching is off): give "
                            f"high-res steps only, e.g. '{current[knob]}'")
    hd = cfg.hd
    if "ntk_factor_high" in knobs:
        hd = replace(hd, rope_factors_high=(1.0, float(knobs["ntk_factor_high"]), float(knobs["ntk_factor_high"])))
    if "ntk_factor_low" in knobs:
        hd = replace(hd, rope_factors_low=(1.0, float(knobs["ntk_factor_low"]), float(knobs["ntk_factor_low"])))
    if "first_chunk_attn_coef" in knobs:
        hd = replace(hd, first_chunk_attn_coef=float(knobs["first_chunk_attn_coef"]))
    return cfg.with_(hd=hd, low_res_scale=float(knobs.get("low_res_scale", cfg.low_res_scale)),
                     shift=float(knobs.get("shift", cfg.shift)),
                     first_chunk=steps.get("first_chunk_steps", cfg.first_chunk),
                     later_chunks=steps.get("later_chunk_steps", cfg.later_chunks))
