"""Generate -> decode -> write, streamed chunk by chunk: the engine's end-to-end path (CLI and Python API).

Latent chunks from the sampler are decoded by the VAE as one causal stream and appended to the video file chunk by
chunk, so a long video costs the memory of one chunk. By default the VAE runs after the denoising (the peak is the
larger step, not their sum); it can also decode each chunk as soon as it exists.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .config import MODEL_PRESETS, SamplerConfig
from .model import CausalWanModel
from .overlap import DecodeBeside
from .sampler import LatentChunk, PromptSchedule, seeded_generator, story_chunks, stream_video
from .vae import TiledDecoder, TinyWanDecoder, WanVAE, WanVAEConfig, check_finite_frames, denormalize
from .video import WAN_FPS, VideoWriter, check_video_path, made_folders, uint8_frames

log = logging.getLogger(__name__)

EMBEDDED_WEIGHTS_SEED = 0
EMBEDDED_VAE = WanVAEConfig(base_dim=8)


@dataclass(frozen=True)
class ChunkTiming:
    chunk: int
    latent_frames: int
    video_frames: int
    cached_frames: int
    model_calls: int
    denoise_s: float
    decode_s: float
    write_s: float  # the frames' finite check, their copy to the host and the wait for the encoder thread


@dataclass(frozen=True)
class RunReport:
    path: Path
    width: int
    height: int
    frames: int
    chunks: tuple[ChunkTiming, ...]

    @property
    def denoise_s(self) -> float:
        return sum(c.denoise_s for c in self.chunks)

    @property
    def decode_s(self) -> float:
        return sum(c.decode_s for c in self.chunks)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "width": self.width, "height": self.height, "frames": self.frames,
                "denoise_s_per_frame": self.denoise_s / self.frames, "decode_s": self.decode_s,
                "chunks": [{**asdict(c), "chunk": c.chunk + 1} for c in self.chunks]}  # numbered from 1, as in table()

    def table(self) -> str:
        head = (f"{'chunk':>5} {'latent':>6} {'frames':>6} {'cached':>6} {'calls':>5} {'denoise s':>10} "
                f"{'decode s':>9} {'write s':>8}")
        rows = [head, "-" * len(head)]
        for c in self.chunks:
            rows.append(f"{c.chunk + 1:>5} {c.latent_frames:>6} {c.video_frames:>6} {c.cached_frames:>6} "
                        f"{c.model_calls:>5} {c.denoise_s:>10.3f} {c.decode_s:>9.3f} {c.write_s:>8.3f}")
        rows.append(f"total: {self.frames} frames {self.width}x{self.height}, denoise {self.denoise_s:.3f} s "
                    f"({self.denoise_s / self.frames:.4f} s/frame), decode {self.decode_s:.3f} s -> {self.path}")
        return "\n".join(rows)


def random_text_embedding(prompt: str, text_dim: int, tokens: int = 16) -> torch.Tensor:
    """A fixed random stand-in for text-encoder states, derived from the prompt (embedded default only).

    # [1, tokens, text_dim]
    """
    return torch.randn(1, tokens, text_dim, generator=seeded_generator(prompt))


def embedded_default(device: str | torch.device = "cpu") -> tuple[CausalWanModel, WanVAE]:
    """The `tiny` DiT and a small Wan VAE with seeded random weights: runs anywhere, shows the plumbing, not art."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_WEIGHTS_SEED)
        model = CausalWanModel(MODEL_PRESETS["tiny"]).eval()
        vae = WanVAE(EMBEDDED_VAE).eval()
    return model.to(device), vae.to(device)


def checked_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (None: CUDA when this torch sees a GPU, else the CPU); one it cannot use is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use cpu, or "
                             "install a CUDA build of torch")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"device {device}: HiStream runs on cpu or cuda")
    return device


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


DECODE_ORDERS = ("after", "interleaved", "overlapped")
TILES_ARE_FOR_THE_VAE = "decode tiles apply to the Wan VAE; the tiny decoder is small enough to decode whole frames"


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy in CPU memory (of a meta tensor, in a memory prediction, an uninitialized one of its shape)."""
    return torch.empty(t.shape, dtype=t.dtype) if t.device.type == "meta" else t.cpu()


def decoded_chunks(model: CausalWanModel, decoder, context: torch.Tensor | PromptSchedule, width: int, height: int,
                   frames: int, config: SamplerConfig, seed: int, *, order: str = "after",
                   should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[LatentChunk, torch.Tensor, float]]:
    """Yield (chunk, its frames [B, 3, t, H, W] in [-1, 1], decode seconds) chunk by chunk, in video order.

    The decode seconds are the time it took to get the frames minus any denoising done meanwhile (a tiled decoder
    decodes a segment of chunks in the pull of its first chunk).

    ``order="after"``: denoise every chunk first, keeping only its latents (in CPU memory, about 2 MB per latent
    frame at 1080p), then decode them as one stream: the DiT's caches are gone before the VAE starts, so the peak
    is the larger of the two steps instead of their sum (what fits 1080p into 24 GiB). ``"interleaved"``: decode
    each chunk as soon as it is denoised: the first frames are ready sooner, but the DiT's caches and the decode
    share memory. ``"overlapped"``: as interleaved, but the decode runs in a worker thread (on CUDA, on its own
    stream) while the next chunk is denoised (:mod:`.overlap`); its decode seconds are wall time from the chunk's
    arrival, overlapping the denoising. The decoder's stream owns its causal caches (decode_stream) in every order;
    the frames are identical.
    """
    if order not in DECODE_ORDERS:
        raise ValueError(f"unknown decode order {order!r}; choose one of {DECODE_ORDERS}")
    device = next(model.parameters()).device
    if order == "overlapped":
        yield from _decoded_beside(model, decoder, context, width, height, frames, config, seed, device, should_stop)
        return
    produced: deque[LatentChunk] = deque()  # chunks whose frames are not out yet, in video order
    interleaved = order == "interleaved"  # then pulling frames denoises chunks first
    denoising = 0.0  # seconds of denoising since frames last came out

    def latents():
        nonlocal denoising
        for chunk in stream_video(model, context, width, height, frames, config, seed, should_stop=should_stop):
            if not interleaved:  # waiting chunks wait in host memory, so a long video's GPU memory stays flat
                chunk = replace(chunk, latents=_to_host(chunk.latents))
            produced.append(chunk)
            denoising += chunk.seconds
            yield denormalize(chunk.latents)

    if interleaved:
        source = latents()
    else:  # list() runs the sampler to its end, so it (and its caches) is freed before the first decode
        source = iter(list(latents()))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the caches' blocks back rather than let the VAE fit around them
    stream = decoder.decode_stream(source)
    denoising = 0.0
    while True:
        started = time.perf_counter()
        try:
            video = next(stream)
        except StopIteration:
            return
        _sync(device)
        decode_s, denoising = time.perf_counter() - started - denoising, 0.0
        yield produced.popleft(), video, decode_s


def _decoded_beside(model, decoder, context, width, height, frames, config, seed, device, should_stop):
    """decoded_chunks' "overlapped" order: the sampler runs here, the decoder in a DecodeBeside worker."""
    produced: deque[LatentChunk] = deque()
    beside = DecodeBeside(decoder, device)
    try:
        for chunk in stream_video(model, context, width, height, frames, config, seed, should_stop=should_stop):
            produced.append(chunk)
            beside.put(denormalize(chunk.latents))
            for video, seconds in beside.results(block=False):
                yield produced.popleft(), video, seconds
        beside.close()
        for video, seconds in beside.results(block=True):
            yield produced.popleft(), video, seconds
    finally:
        beside.close()


def generate_to_file(
    model: CausalWanModel,
    vae: WanVAE | TinyWanDecoder,
    context: torch.Tensor | PromptSchedule,
    out: str | Path,
    width: int,
    height: int,
    frames: int,
    config: SamplerConfig,
    seed: int,
    *,
    fps: float = WAN_FPS,
    tile: int | None = None,
    order: str = "after",
    on_chunk: Callable[[LatentChunk, ChunkTiming], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunReport:
    """Generate a video and stream it into ``out`` (.mp4 or .webm). On any error no file is left under ``out``.

    ``context``: umT5 states # [1, tokens, dim], or a prompt schedule [(first chunk, states), ...].
    ``order``: when the VAE runs, see :func:`decoded_chunks` ("after": least memory; "interleaved": first frames
    sooner). ``tile``: decode in spatial tiles of this many latent pixels (Wan VAE only). ``vae`` may be the
    tiny TAEHV decoder instead of the Wan VAE: much faster, lower quality.
    """
    for name, value in (("seed", seed), ("tile", tile or 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if tile and not isinstance(vae, WanVAE):
        raise ValueError(f"{TILES_ARE_FOR_THE_VAE} (leave tile at None)")
    out = Path(out)
    device = next(model.parameters()).device
    context = (context.to(device) if isinstance(context, torch.Tensor)
               else [(start, states.to(device)) for start, states in context])
    decoder = TiledDecoder.overlapping_by_a_quarter(vae, tile) if tile else vae
    timings = []
    # Encoding to H.264 is CPU work: it runs in a thread while the GPU works on the next chunk. At most one
    # chunk is in flight, so memory stays flat; an error in the thread surfaces at the next chunk.
    with torch.no_grad(), VideoWriter(out, fps=fps) as writer, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None
        for chunk, video, decode_s in decoded_chunks(model, decoder, context, width, height, frames, config, seed,
                                                     order=order, should_stop=should_stop):
            handed = time.perf_counter()
            if pending is not None:
                pending.result()
            pending = encoder.submit(writer.write, uint8_frames(check_finite_frames(video, chunk.index + 1)).cpu())
            timing = ChunkTiming(chunk.index, chunk.latents.shape[2], video.shape[2], chunk.cached_frames,
                                 chunk.model_calls, chunk.seconds, decode_s, time.perf_counter() - handed)
            timings.append(timing)
            log.info("chunk %d/%d decoded (%d frames)", chunk.index + 1, chunk.num_chunks, video.shape[2])
            if on_chunk is not None:
                on_chunk(chunk, timing)
        if pending is not None:
            pending.result()
    return RunReport(out, width, height, frames, tuple(timings))


class HiStreamPipeline:
    """One-call text-to-video outside ComfyUI: the user's DiT, VAE and (optionally) umT5 files.

    >>> pipe = HiStreamPipeline.from_files(model="self_forcing_dmd.pt", vae="wan_2.1_vae.safetensors",
    ...                                    text_encoder="umt5_xxl_fp16.safetensors", tokenizer="tokenizer.json")
    >>> pipe.generate("a corgi surfing", mode="histream+", out="corgi.mp4")          # doctest: +SKIP

    Prompts are encoded (or read from the embedding cache) and the text encoder is freed before the DiT runs, so
    the 11 GB encoder and the sampler never share memory.
    """

    def __init__(self, model: CausalWanModel, vae: WanVAE | TinyWanDecoder, text_encoder=None) -> None:
        self.model, self.vae, self.text_encoder = model, vae, text_encoder

    @classmethod
    def from_files(cls, model: str | Path, vae: str | Path | None, text_encoder: str | Path | None = None,
                   tokenizer: str | Path | None = None, *, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, compile: bool = False, fp8_weights: bool = False,
                   fp8_matmul: bool = False,
                   text_cache_dir: str | Path | None = None,
                   tiny_decoder: str | Path | None = None) -> "HiStreamPipeline":
        """``vae``: the Wan2.1 VAE file; or None with ``tiny_decoder`` (a TAEHV taew2_1 file) for fast drafts.
        ``fp8_weights``: the blocks' linear weights kept in fp8 (half the DiT's memory, upcast per call);
        ``fp8_matmul``: the blocks multiply in fp8 (``CausalWanModel.use_fp8_matmul``; bf16, fp8 tensor cores)."""
        from .checkpoints import load_wan_model
        from .text import TextEncoder
        from .vae import load_tiny_decoder, load_vae
        if (vae is None) == (tiny_decoder is None):
            raise ValueError("give the Wan VAE file (wan_2.1_vae.safetensors) or a tiny decoder (taew2_1), one of them")
        device = checked_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {dtype} cannot be a compute dtype; use torch.bfloat16 (GPU), torch.float16 or "
                             "torch.float32 (fp8 is a weight option: fp8_weights=True or fp8_matmul=True)")
        encoder = None
        if text_encoder is not None:
            extra = {} if text_cache_dir is None else {"cache_dir": text_cache_dir}
            encoder = TextEncoder(text_encoder, tokenizer, device=device, **extra)
        dit = load_wan_model(model, weight_dtype=torch.float8_e4m3fn if fp8_weights else None, compute_dtype=dtype,
                             device=device)
        if fp8_matmul:
            dit.use_fp8_matmul()
        if compile:
            dit.compile_blocks()
        decoder = (load_vae(vae, device=device, dtype=dtype) if vae is not None
                   else load_tiny_decoder(tiny_decoder, device=device, dtype=dtype))
        return cls(dit, decoder, encoder)

    def encode(self, prompt: str) -> torch.Tensor:
        """umT5 states of a prompt # [1, tokens, 4096]; frees the encoder afterwards (the cache keeps the result)."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass text_encoder= (umt5_xxl_fp16.safetensors) to "
                             "from_files, or give generate() precomputed states instead of a prompt")
        try:
            return self.text_encoder.encode(prompt)
        finally:
            self.text_encoder.free()

    def generate(self, prompt: str | torch.Tensor | Sequence[tuple[int, str | torch.Tensor]], *, width: int = 1920,
                 height: int = 1088, frames: int = 81, mode: str = "histream", config: SamplerConfig | None = None,
                 seed: int = 0, out: str | Path = "histream.mp4", fps: float = WAN_FPS, tile: int | None = None,
                 order: str = "after", on_chunk: Callable[[LatentChunk, ChunkTiming], None] | None = None) -> RunReport:
        """Generate ``frames`` frames into ``out``; ``config`` (a SamplerConfig) overrides the named ``mode``.

        Missing folders of ``out`` are made (and removed again if the run fails), as the command line does.

        ``prompt``: a prompt, precomputed umT5 states, or a story [(first video frame, prompt or states), ...]
        starting at frame 0 (each later prompt takes over with the first chunk at or after its frame, with a KV
        recache). A story's frames are checked before any prompt is encoded.
        """
        from .modes import mode_config
        from .sampler import check_prompt_starts, video_geometry
        config = config or mode_config(mode)
        # the request is checked before the prompts are encoded (the encoder takes a while to load)
        geometry = video_geometry(width, height, frames, config, self.model.cfg.patch_size[1])
        out = check_video_path(out, fps, folder_may_be_missing=True)
        if isinstance(prompt, str):
            context = self.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            context = prompt
        elif isinstance(prompt, Sequence) and prompt and all(
                isinstance(e, (tuple, list)) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
                and isinstance(e[1], (str, torch.Tensor)) for e in prompt):
            starts = story_chunks([frame for frame, _ in prompt], config.stream.chunk_frames)
            check_prompt_starts(starts, geometry, config.stream.chunk_frames)
            context = [(start, self.encode(text) if isinstance(text, str) else text)
                       for start, (_, text) in zip(starts, prompt)]
        else:
            raise ValueError(f"prompt must be a string, text states [1, tokens, {self.model.cfg.text_dim}] or a story "
                             f"[(first video frame, prompt or states), ...]; got {type(prompt).__name__}")
        with made_folders(out.parent):
            return generate_to_file(self.model, self.vae, context, out, width, height, frames, config, seed, fps=fps,
                                    tile=tile, order=order, on_chunk=on_chunk)
