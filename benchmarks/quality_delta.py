"""Quality cost of the fp8 options: relative error of each chunk's x0 against the baseline, same seed.

    python benchmarks/quality_delta.py                                        # 1.3B, 1920x1088, 25 frames, CUDA bf16
    python benchmarks/quality_delta.py --model tiny --device cpu --width 128 --height 96 --frames 21

Variants: fp8-kv (SamplerConfig.kv_cache_fp8: both caches float8 e4m3 with a scale per token and head),
fp8-weights (the blocks' linear weights stored as float8 e4m3 with a scale per output channel, as the loader's
weight_dtype fp8 keeps them, and upcast per call), fp8-weights-raw (the same as a raw cast, as ComfyUI's plain fp8
checkpoints hold them) and fp8-matmul (CausalWanModel.use_fp8_matmul: the blocks' linear layers multiply in fp8,
weights per output channel and inputs per token scaled; bf16 only). Random weights at the real config: the figure bounds
how far the option moves the computation, not how a trained model's video looks. The first chunk has nothing
cached, so fp8-kv leaves it exact.
Prints one row per variant (error per chunk) and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histream_core.config import MODEL_PRESETS  # noqa: E402
from histream_core.model import CausalWanModel  # noqa: E402
from histream_core.model.layers import CastLinear  # noqa: E402
from histream_core.modes import MODES, mode_config  # noqa: E402
from histream_core.sampler import stream_video  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("fp8-kv", "fp8-matmul", "fp8-weights", "fp8-weights-raw")


def chunk_latents(model, context, args, kv_cache_fp8: bool) -> list[torch.Tensor]:
    cfg = mode_config(args.mode).with_(kv_cache_fp8=kv_cache_fp8)
    with torch.no_grad():
        return [c.latents for c in stream_video(model, context, args.width, args.height, args.frames, cfg, args.seed)]


def block_weights_cast_to_fp8(model: CausalWanModel) -> CausalWanModel:
    """The blocks' linear weights as a raw e4m3 cast (no scales), as plain fp8 checkpoints hold them."""
    for module in model.blocks.modules():
        if isinstance(module, CastLinear):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    return model


CHANGED_MODELS = {"fp8-matmul": lambda model: model.use_fp8_matmul(),
                  "fp8-weights": lambda model: model.store_block_weights_in_fp8(),
                  "fp8-weights-raw": block_weights_cast_to_fp8}


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-1.3b", choices=list(MODEL_PRESETS))
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--mode", default="histream", choices=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES))
    parser.add_argument("--variants", help="comma-separated, of " + ", ".join(VARIANTS) + " (default: all; "
                        "fp8-matmul only with --dtype bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    variants = ([v for v in args.variants.split(",") if v] if args.variants is not None
                else [v for v in VARIANTS if v != "fp8-matmul" or args.dtype == "bf16"])
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "fp8-matmul" in variants and args.dtype != "bf16":
        parser.error("the fp8-matmul variant needs --dtype bf16")

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(MODEL_PRESETS[args.model], compute_dtype=dtype)
    model = model.to(dtype).eval().requires_grad_(False)
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    context = context.to(device)
    baseline = chunk_latents(model, context, args, kv_cache_fp8=False)
    results = {}
    if "fp8-kv" in variants:
        results["fp8-kv"] = relative_errors(chunk_latents(model, context, args, kv_cache_fp8=True), baseline)
    for name in variants:
        if name in CHANGED_MODELS:
            changed = CHANGED_MODELS[name](copy.deepcopy(model))
            results[name] = relative_errors(chunk_latents(changed, context, args, kv_cache_fp8=False), baseline)
            del changed

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, {args.width}x{args.height}, {args.frames} frames, {args.mode}, {args.dtype}, {device_name}: "
          "relative error of each chunk's x0 against the baseline")
    for name, errors in results.items():
        print(f"{name:<16} " + " ".join(f"{e:.2%}" for e in errors))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "args": vars(args), "errors": results}, indent=2))


if __name__ == "__main__":
    main()
