"""Command line: `python -m histream_core generate | bench | flops | memory | inspect`.

`generate` with no checkpoint runs the embedded default (the `tiny` DiT and a small VAE, seeded random weights), so
it works on any fresh machine; with `--checkpoint`, `--vae` and `--text-embeds` it runs the user's own files.
`bench` times the denoising of each mode (the paper's per-frame latency) on a checkpoint or on random weights of a
preset: compute does not depend on the weights.
The generate request's checks (before any model file is read) are in ``cli_request``, ``--config`` files in
``cli_config``; this module holds the commands, the parser and the exit statuses.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading

import torch

from .cli_config import config_file_args
from .cli_request import (DTYPES, EMBEDDED_PROMPT, Request, check_fp8_matmul_flag, check_tile, checked_request,
                          checked_text_embeds, sampler_config)
from .config import MODEL_PRESETS
from .flops import H100_BF16_TFLOPS, flops_table, format_table
from .model import BACKENDS, AttentionBackendError, CausalWanModel
from .model.attention import check_backend_runs
from .modes import MODES, STEPS_EXAMPLE
from .pipeline import (DECODE_ORDERS, EMBEDDED_VAE, HiStreamPipeline, checked_device, embedded_default,
                       generate_to_file, random_text_embedding)
from .sampler import video_geometry
from .video import made_folders
from .weight_files import is_host_out_of_memory

log = logging.getLogger(__name__)




def cmd_generate(args) -> int:
    request = checked_request(args)
    pipe, context = _pipeline_and_text(args, request)
    if request.starts:
        encode = pipe.encode if pipe.text_encoder is not None else (
            lambda prompt: random_text_embedding(prompt, pipe.model.cfg.text_dim))
        context = [(0, context), *((start, encode(prompt)) for start, prompt in request.starts)]
    size = request.geometry
    with made_folders(request.out.parent):
        report = generate_to_file(pipe.model, pipe.vae, context, request.out, size.width, size.height, size.frames,
                                  request.cfg, args.seed, fps=args.fps, tile=args.tile, order=args.decode_order)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0


def _pipeline_and_text(args, request: Request) -> tuple[HiStreamPipeline, torch.Tensor]:
    """The user's files (or the embedded default) loaded, and the first prompt's states."""
    from .vae import load_tiny_decoder

    if args.checkpoint is not None:
        pipe = HiStreamPipeline.from_files(args.checkpoint, args.vae, args.text_encoder, args.tokenizer,
                                           device=request.device, dtype=request.dtype, compile=args.compile,
                                           fp8_weights=args.fp8_weights, fp8_matmul=args.fp8_matmul,
                                           text_cache_dir=args.text_cache, tiny_decoder=args.tiny_decoder)
        return pipe, request.text_embeds if request.text_embeds is not None else pipe.encode(args.prompt)
    log.warning("embedded default: tiny random DiT + small random VAE (a plumbing check; pass --checkpoint for art)")
    model, vae = embedded_default(request.device)
    if args.tiny_decoder:
        vae = load_tiny_decoder(args.tiny_decoder, device=request.device)
    model.compute_dtype = request.dtype
    if args.fp8_weights:
        model.store_block_weights_in_fp8()
    if args.fp8_matmul:
        model.use_fp8_matmul()
    if args.compile:
        model.compile_blocks()
    context = (request.text_embeds if request.text_embeds is not None
               else random_text_embedding(args.prompt or EMBEDDED_PROMPT, model.cfg.text_dim))
    return HiStreamPipeline(model, vae), context


def cmd_bench(args) -> int:
    from .checkpoints import load_wan_model
    from .timing import format_timings, time_mode

    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"--modes: unknown {unknown or 'empty list'}; choose from {', '.join(MODES)}")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be at least 1 and --warmup at least 0, got {args.repeats} and {args.warmup}")
    device, dtype = checked_device(args.device), DTYPES[args.dtype]
    for mode in modes:  # the request first: building the model takes a while
        video_geometry(args.width, args.height, args.frames, sampler_config(args, mode))
    if args.attention:
        check_backend_runs(args.attention, device, dtype)
    check_fp8_matmul_flag(args, device)
    text = checked_text_embeds(args.text_embeds, args.checkpoint, MODEL_PRESETS[args.model])
    if args.checkpoint:
        model = load_wan_model(args.checkpoint, weight_dtype=torch.float8_e4m3fn if args.fp8_weights else None,
                               compute_dtype=dtype, device=device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = CausalWanModel(MODEL_PRESETS[args.model], compute_dtype=dtype)
        model = model.to(dtype)
        if args.fp8_weights:
            model.store_block_weights_in_fp8()
    model = model.eval().requires_grad_(False)
    if args.fp8_matmul:
        model.use_fp8_matmul()
    if args.compile:
        model.compile_blocks()
    text = (text if text is not None else
            torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        rows = [time_mode(model, text.to(device), mode, sampler_config(args, mode), args.width, args.height,
                          args.frames, device=device, warmup=args.warmup, repeats=args.repeats, rate_tflops=args.rate)
                for mode in modes]
    source = args.checkpoint or f"{args.model} (random weights)"
    if args.json:
        print(json.dumps({"model": source, "device": str(device), "dtype": args.dtype, "width": args.width,
                          "height": args.height, "frames": args.frames, "attention": args.attention or "sdpa",
                          "compile": args.compile, "kv_cache_fp8": args.kv_cache_fp8,
                          "fp8_weights": args.fp8_weights, "fp8_matmul": args.fp8_matmul, "repeats": args.repeats,
                          "warmup": args.warmup, "modes": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(f"{source}, {args.width}x{args.height}, {args.frames} frames, {args.dtype} on {device}"
              f"{', compiled' if args.compile else ''}{', fp8 weights' if args.fp8_weights else ''}"
              f"{', fp8 K/V cache' if args.kv_cache_fp8 else ''}"
              f"{', fp8 matmul' if args.fp8_matmul else ''}: denoising "
              f"(with cache passes, no decode), median of {args.repeats} after {args.warmup} warm-up; floor = the "
              f"mode's FLOPs at {args.rate:g} TFLOP/s")
        print(format_timings(rows))
    return 0


def cmd_flops(args) -> int:
    cfg = MODEL_PRESETS[args.model]
    rows = flops_table(cfg, args.width, args.height, args.frames)
    if args.json:
        print(json.dumps({r.mode: r.as_dict() for r in rows}, indent=2))
    else:
        print(f"{args.model}, {args.width}x{args.height}, {args.frames} frames (transformer matmuls, 2 FLOP per MAC)")
        print(format_table(rows, args.rate))
    return 0


def cmd_memory(args) -> int:
    from .memory import predict_memory
    from .vae import WanVAEConfig
    check_fp8_matmul_flag(args, None)  # a prediction needs no fp8 hardware
    check_tile(args.tile)
    vae = EMBEDDED_VAE if args.model == "tiny" else WanVAEConfig()
    prediction = predict_memory(MODEL_PRESETS[args.model], vae, args.width, args.height, args.frames,
                                sampler_config(args), DTYPES[args.dtype], tile=args.tile,
                                fp8_weights=args.fp8_weights, fp8_matmul=args.fp8_matmul)
    if args.json:
        print(json.dumps({"model": args.model, "mode": args.mode, "dtype": args.dtype, "width": args.width,
                          "height": args.height, "frames": args.frames, "tile": args.tile,
                          "kv_cache_fp8": args.kv_cache_fp8, "fp8_weights": args.fp8_weights,
                          "fp8_matmul": args.fp8_matmul, **prediction.as_dict()}, indent=2))
    else:
        print(f"{args.model} + Wan VAE, {args.dtype}, {args.mode}, {args.width}x{args.height}, {args.frames} frames"
              f"{f', decode tiles {args.tile}' if args.tile else ''}: predicted peak of live tensors (add the CUDA "
              "context and cuDNN workspaces, ~1-2 GiB)")
        if prediction.frames_run != args.frames:
            print(f"  (run at {prediction.frames_run} frames: with the sliding window the peaks are flat in length)")
        print(prediction.table())
    return 0


def cmd_inspect(args) -> int:
    from .checkpoints import inspect_checkpoint
    info = inspect_checkpoint(args.file, head_dim=args.head_dim)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _generate_parser(sub) -> argparse.ArgumentParser:
    gen = sub.add_parser("generate", help="generate a video into an mp4/webm, printing per-chunk timings")
    gen.add_argument("--checkpoint", help="Wan2.1 causal DiT file (.safetensors/.pt); omit for the embedded default")
    gen.add_argument("--vae", help="Wan2.1 VAE file (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)")
    gen.add_argument("--tiny-decoder", help="decode with TAEHV's tiny decoder instead (taew2_1.safetensors or .pth): "
                     "much faster, lower quality")
    gen.add_argument("--text-encoder", help="umT5-XXL file (umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled"
                     ".safetensors or models_t5_umt5-xxl-enc-bf16.pth)")
    gen.add_argument("--tokenizer", help="umT5 tokenizer: tokenizer.json, spiece.model or their folder "
                     "(optional for ComfyUI files that embed it)")
    gen.add_argument("--text-cache", help="folder of cached prompt embeddings (default ~/.cache/histream/text)")
    gen.add_argument("--text-embeds", help="precomputed umT5 states (.safetensors key 'context' or .pt)")
    gen.add_argument("--prompt", help="the prompt (the embedded default, which only seeds a stand-in text "
                     f"embedding with it, takes {EMBEDDED_PROMPT!r} when none is given)")
    gen.add_argument("--schedule", action="append", metavar="FRAME:PROMPT",
                     help="a later prompt taking over at a video frame (repeatable; KV recache at each switch)")
    gen.add_argument("--config", help="JSON file of generate options used as defaults (e.g. {\"mode\": \"histream+\"})")
    gen.add_argument("--width", type=int, help="pixels (default 1920; 256 for the embedded default)")
    gen.add_argument("--height", type=int, help="pixels (default 1088; 160 for the embedded default)")
    gen.add_argument("--frames", type=int, help="4k+1 frames (default 81; 33 for the embedded default)")
    gen.add_argument("--mode", default="histream", choices=list(MODES),
                     help="default: histream (4 steps per chunk); histream+ is the faster one")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="outputs/histream.mp4", help=".mp4 (H.264) or .webm (VP9)")
    gen.add_argument("--fps", type=float, default=16.0)
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES))
    gen.add_argument("--tile", type=int, help="decode in spatial tiles of this many latent pixels (saves memory; "
                     "0: whole frames); tiles decode 81-frame segments, so the table shows a segment's decode time "
                     "on its first chunk")
    gen.add_argument("--decode-order", choices=list(DECODE_ORDERS), default="after",
                     help="after: decode once denoising is done (least memory, the default); interleaved: decode "
                     "each chunk as soon as it exists (first frames sooner, DiT caches and VAE share memory); "
                     "overlapped: as interleaved, decoding in a second thread/CUDA stream while the next chunk "
                     "is denoised")
    knobs = gen.add_argument_group("the paper's readings, on top of --mode (default: the mode's value; README "
                                   "'How the paper was read')")
    knobs.add_argument("--shift", type=float, help="timestep shift (7; self-forcing and no-hd: 5)")
    knobs.add_argument("--low-res-scale", type=float, help="low resolution = scale x target (0.5)")
    knobs.add_argument("--ntk-factor-high", type=float, help="NTK RoPE factor of the full-resolution passes (5)")
    knobs.add_argument("--ntk-factor-low", type=float, help="NTK RoPE factor of the low-resolution passes (2; 5 is "
                       "the other reading of the paper)")
    knobs.add_argument("--first-chunk-attn-coef", type=float, help="attention scaling of chunk 1's full-resolution "
                       "calls (2; 1 = off)")
    knobs.add_argument("--first-chunk-steps", help=f"chunk 1's base timesteps, e.g. {STEPS_EXAMPLE}")
    knobs.add_argument("--later-chunk-steps", help="the later chunks' base timesteps (histream+: '1000|500')")
    gen.add_argument("--no-window", action="store_true", help="keep every past frame in the cache (no AGSW)")
    gen.add_argument("--kv-cache-fp8", action="store_true",
                     help="store the K/V caches in fp8 (half their memory, slightly off; see README)")
    gen.add_argument("--chunk-frames", type=int, help="latent frames per chunk, M (default 3)")
    gen.add_argument("--anchor-frames", type=int, help="first frames the window keeps for good (default 1)")
    gen.add_argument("--local-frames", type=int, help="latest frames the window keeps (default 2: the paper's M-1 "
                     "for M=3; set it together with --chunk-frames)")
    gen.add_argument("--rope-positions", choices=["absolute", "window"],
                     help="window: renumber cached frames before each chunk (videos past 81 frames)")
    gen.add_argument("--attention", choices=list(BACKENDS))
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (CUDA: ~1.4x)")
    gen.add_argument("--fp8-weights", action="store_true",
                     help="keep the transformer blocks' weights in fp8 (half the DiT's memory, slightly off)")
    gen.add_argument("--fp8-matmul", action="store_true",
                     help="multiply in fp8 in the transformer blocks (bf16, fp8 tensor cores: Ada/Hopper or newer; "
                     "faster, slightly off; see README)")
    gen.add_argument("--json", action="store_true", help="print the timings as JSON")
    gen.set_defaults(run=cmd_generate)
    return gen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m histream_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)

    bench = sub.add_parser("bench", help="per-frame denoising latency, FLOPs and TFLOP/s of each mode (the paper's "
                           "ablation rows) on a checkpoint or random weights")
    bench.add_argument("--checkpoint", help="Wan2.1 causal DiT file; omit for random weights of --model")
    bench.add_argument("--model", default="wan2.1-1.3b", choices=list(MODEL_PRESETS))
    bench.add_argument("--text-embeds", help="umT5 states to condition on (default: random ones; cost is the same)")
    bench.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all)")
    bench.add_argument("--width", type=int, default=1920)
    bench.add_argument("--height", type=int, default=1088)
    bench.add_argument("--frames", type=int, default=81)
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=list(DTYPES))
    bench.add_argument("--attention", choices=list(BACKENDS))
    bench.add_argument("--kv-cache-fp8", action="store_true", help="K/V caches in fp8")
    bench.add_argument("--fp8-weights", action="store_true", help="the blocks' weights stored in fp8")
    bench.add_argument("--fp8-matmul", action="store_true", help="the blocks multiply in fp8 (bf16, Ada/Hopper+)")
    bench.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (CUDA)")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--warmup", type=int, default=1, help="untimed videos first (compilation, autotuning)")
    bench.add_argument("--rate", type=_positive, default=H100_BF16_TFLOPS,
                       help="matmul TFLOP/s for the floor column")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(run=cmd_bench, rope_positions=None, no_window=False)

    flops = sub.add_parser("flops", help="exact transformer FLOPs of every mode (no weights, no memory)")
    flops.add_argument("--model", default="wan2.1-1.3b", choices=list(MODEL_PRESETS))
    flops.add_argument("--width", type=int, default=1920)
    flops.add_argument("--height", type=int, default=1088)
    flops.add_argument("--frames", type=int, default=81)
    flops.add_argument("--rate", type=_positive, default=H100_BF16_TFLOPS,
                       help="matmul TFLOP/s for the floor column")
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(run=cmd_flops)

    memory = sub.add_parser("memory", help="predicted peak GPU memory of a request, computed on the CPU (about a "
                            "minute at 1080p)")
    memory.add_argument("--model", default="wan2.1-1.3b", choices=list(MODEL_PRESETS))
    memory.add_argument("--width", type=int, default=1920)
    memory.add_argument("--height", type=int, default=1088)
    memory.add_argument("--frames", type=int, default=81)
    memory.add_argument("--mode", default="histream", choices=list(MODES), help="default: histream")
    memory.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    memory.add_argument("--tile", type=int, help="decode in spatial tiles of this many latent pixels")
    memory.add_argument("--kv-cache-fp8", action="store_true", help="K/V caches in fp8")
    memory.add_argument("--fp8-weights", action="store_true", help="the blocks' weights stored in fp8")
    memory.add_argument("--fp8-matmul", action="store_true", help="the fp8 matmul option (fp8 block weights too)")
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(run=cmd_memory, rope_positions=None, attention=None, no_window=False)

    inspect = sub.add_parser("inspect", help="what a checkpoint is (layout, config, dtype, parameters)")
    inspect.add_argument("file")
    inspect.add_argument("--head-dim", type=int, default=128,
                         help="attention head size, which the shapes cannot tell (128 in every Wan2.1 model)")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def _out_of_memory(args, where: str) -> str:
    """What to change after running out of memory: the options this run has not used yet."""
    tips = []
    if getattr(args, "command", None) == "generate":
        tips += [tip for unused, tip in (
            (not args.tile, "decode in tiles (--tile 64)"),
            (args.decode_order != "after", "decode after denoising (--decode-order after)"),
            (not args.kv_cache_fp8, "store the caches in fp8 (--kv-cache-fp8)"),
            (not (args.fp8_weights or args.fp8_matmul), "keep the blocks' weights in fp8 (--fp8-weights)")) if unused]
    tips.append("lower --width/--height")
    predict = ("; 'python -m histream_core memory' predicts a request's peak GPU memory without a GPU"
               if where == "GPU" else "")
    return f"out of {where} memory: {', '.join(tips)}{predict}"


# SIGTERM (kill, a job scheduler) and SIGHUP (the terminal or ssh session closed) stop a run as Ctrl-C does
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so no half-written video is left behind


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: tables and JSON go to stdout, messages and errors through logging to stderr.

    Exit status: 0 done, 2 a request or file that cannot work (the message says what to change), 3 out of memory,
    130 interrupted (Ctrl-C, SIGTERM or SIGHUP; nothing is saved)."""
    for stream in (sys.stdout, sys.stderr):  # a path the terminal cannot encode must not fail a finished run
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop_on_signal) for s in STOP_SIGNALS} if in_main_thread else {}
    args = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        generate = _generate_parser(argparse.ArgumentParser().add_subparsers())
        args = build_parser().parse_args(config_file_args(argv, generate))
        return args.run(args)
    except torch.OutOfMemoryError:
        log.error("%s", _out_of_memory(args, "GPU"))
        return 3
    except KeyboardInterrupt:
        log.error("interrupted: nothing was saved")
        return 130
    except (ValueError, OSError, ImportError, AttentionBackendError, RuntimeError, MemoryError) as exc:
        if is_host_out_of_memory(exc):
            log.error("%s", _out_of_memory(args, "host (CPU)"))
            return 3
        if isinstance(exc, RuntimeError) and not isinstance(exc, AttentionBackendError):
            raise  # a bug, not a bad request: keep its traceback
        log.error("%s", exc)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__ = ["main", "build_parser"]
