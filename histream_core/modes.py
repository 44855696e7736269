"""Named modes: presets over the switches of ``SamplerConfig`` (so the paper's ablations are configurations).

| mode         | DRC | AGSW | steps chunk 1 (low+high) | later chunks | HD tech |
|--------------|-----|------|--------------------------|--------------|---------|
| histream     | on  | on   | 2 + 2                    | 2 + 2        | on      |
| histream+    | on  | on   | 2 + 2                    | 1 + 1        | on      |
| self-forcing | off | off  | 0 + 4                    | 0 + 4        | off     |
| no-drc       | off | on   | 0 + 4                    | 0 + 4        | on      |
| no-agsw      | on  | off  | 2 + 2                    | 2 + 2        | on      |
| two-step     | on  | on   | 1 + 1                    | 1 + 1        | on      |
| no-hd        | on  | on   | 2 + 2                    | 2 + 2        | off     |

HiStream+'s later chunks run base steps 1000 (low) and 500 (high): warped at shift 7 that is t = 1000 then 875, the
same noise level at which chunk 1 hands its upsampled x0 to the high-resolution steps. So the low step still starts
from pure noise as the model was trained to, the high step refines from the level the high phase always starts
at, and the pair equals the generator's own 2-step list [1000, 500], a point on its trained trajectory.
"self-forcing" is the Self-Forcing sampler unchanged (shift 5, plain RoPE and attention) at the target resolution.
"no-hd" is the paper's "w/o HD Tech" ablation as we read it: HiStream with every inference-time HD adjustment undone
(shift back to 5, plain RoPE, no first-chunk attention scaling).
"""

from __future__ import annotations

from .config import ChunkSteps, HDConfig, SamplerConfig, StreamConfig

FOUR_STEPS_DRC = ChunkSteps(low=(1000.0, 750.0), high=(500.0, 250.0))
FOUR_STEPS_FULL_RES = ChunkSteps(low=(), high=(1000.0, 750.0, 500.0, 250.0))
TWO_STEPS_DRC = ChunkSteps(low=(1000.0,), high=(500.0,))

MODES: dict[str, SamplerConfig] = {
    "histream": SamplerConfig(),
    "histream+": SamplerConfig(later_chunks=TWO_STEPS_DRC),
    "self-forcing": SamplerConfig(drc=False, stream=StreamConfig(window=False), shift=5.0,
                                  first_chunk=FOUR_STEPS_FULL_RES, later_chunks=FOUR_STEPS_FULL_RES,
                                  hd=HDConfig(enabled=False)),
    "no-drc": SamplerConfig(drc=False, first_chunk=FOUR_STEPS_FULL_RES, later_chunks=FOUR_STEPS_FULL_RES),
    "no-agsw": SamplerConfig(stream=StreamConfig(window=False)),
    "two-step": SamplerConfig(first_chunk=TWO_STEPS_DRC, later_chunks=TWO_STEPS_DRC),
    "no-hd": SamplerConfig(shift=5.0, hd=HDConfig(enabled=False)),
}


def mode_config(name: str) -> SamplerConfig:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None
