"""Peak GPU memory of a run, predicted without a GPU: the run goes through on the meta device, counting live bytes.

Meta tensors have shapes and dtypes but no data, so the real 1.3B model at 1080p runs in about a minute on a CPU while
:class:`LiveTensorBytes` sees every tensor torch creates (weights, caches, activations) and when its storage dies.
What it does not see: the CUDA context, cuDNN/cuBLAS workspaces and the caching allocator's rounding, so a GPU's
``max_memory_allocated`` reads a little higher and ``nvidia-smi`` higher still.

One thing is modelled rather than replayed: on meta, ``scaled_dot_product_attention`` takes the math path, which
materializes the attention matrix (28 GB for one 1080p chunk). The fused GPU kernels (cuDNN, flash) allocate only
their output and log-sum-exp, and :func:`fused_attention_on_meta` makes meta do the same.

Checked against the H100 (bf16, 1920x1088, 81 frames, histream+): 17.24 GiB predicted vs 17.4 GiB measured for
the denoising (the code as of that measurement).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import ModelConfig, SamplerConfig
from .model import CausalWanModel
from .vae import TiledDecoder, WanVAE, WanVAEConfig
from .vae.layers import cudnn_conv3d_unreliable
from .video import uint8_frames

GIB = 2**30
FLAT_AFTER_FRAMES = 81  # with the sliding window the peaks stop changing by then (window full, one decode segment)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of device (non-CPU) tensor storages alive while it is active, and their peak.

    A storage counts once however many views share it, from the op that created it until it is freed. Tensors made
    before the mode was entered, and host memory, are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # torch keeps one Python object per storage while it lives, so the id is stable
        if key in self._tracked or storage.device.type == "cpu":
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._tracked[key] = weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._tracked.pop(key, None)


@contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Within the block, SDPA on meta tensors allocates what a fused kernel does: output and log-sum-exp."""
    real = F.scaled_dot_product_attention

    def fused(query, key, value, *args, **kwargs):
        if query.device.type != "meta":
            return real(query, key, value, *args, **kwargs)
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        query.new_empty(query.shape[:-1], dtype=torch.float32)  # the kernel's log-sum-exp, freed on return
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _size(size: int) -> str:
    return f"{size / GIB:8.2f} GiB" if size >= GIB else f"{size / 2**20:8.1f} MiB"


def _drain(items) -> None:
    for _ in items:
        pass


@dataclass(frozen=True)
class MemoryPrediction:
    """Predicted peak bytes of each step of a run, and of the whole run for each decode order."""

    dit_weights: int
    dit_caches: int        # the most the DiT holds between chunks besides its weights (both caches, text K/V)
    denoise_peak: int      # DiT weights included
    vae_weights: int
    decode_peak: int       # VAE weights included, streamed decode of the whole video
    end_to_end: dict[str, int]  # decode order -> peak of generate_to_file's work (both models resident)
    frames_run: int        # the length that was run: capped at FLAT_AFTER_FRAMES with the sliding window

    def rows(self) -> list[tuple[str, str, int]]:
        """(JSON key, table label, bytes) of each figure."""
        return [("dit_weights", "DiT weights", self.dit_weights),
                ("dit_caches", "DiT caches between chunks", self.dit_caches),
                ("denoise_peak", "denoising peak (DiT only)", self.denoise_peak),
                ("vae_weights", "VAE weights", self.vae_weights),
                ("decode_peak", "VAE decode peak (VAE only)", self.decode_peak),
                *((f"end_to_end_{order}", f"end to end, decode order {order!r}", peak)
                  for order, peak in self.end_to_end.items())]

    def table(self) -> str:
        return "\n".join(f"  {label:<40} {_size(size)}" for _, label, size in self.rows())

    def as_dict(self) -> dict:
        """The figures in GiB (keys ending in _gib), and the length run."""
        return {**{f"{key}_gib": round(size / GIB, 3) for key, _, size in self.rows()}, "frames_run": self.frames_run}


def predict_memory(model_cfg: ModelConfig, vae_cfg: WanVAEConfig, width: int, height: int, frames: int,
                   config: SamplerConfig, dtype: torch.dtype = torch.bfloat16, tile: int | None = None,
                   orders: tuple[str, ...] = ("after", "interleaved"), fp8_weights: bool = False,
                   fp8_matmul: bool = False) -> MemoryPrediction:
    """Run the denoising, the decode and the end-to-end path of a request on the meta device and return the peaks.

    Both models stay resident in the end-to-end runs, as in ``generate_to_file``; text states are a stand-in of
    the model's text length (the umT5 encoder is freed before sampling and is not counted). The "overlapped" order
    cannot be predicted here (its decode runs in another thread, which the meter does not see); expect about the
    interleaved peak plus one model call's activations. With the sliding window a request longer than
    FLAT_AFTER_FRAMES runs at that length (its memory is flat: 481 frames gave the 81-frame peaks to 0.01 GiB);
    without it the caches grow with the video, and the whole length runs. ``fp8_weights``: the blocks' linear
    weights stored in fp8 (the loader's weight_dtype fp8); ``fp8_matmul``: as ``CausalWanModel.use_fp8_matmul``
    keeps them.
    """
    frames = min(frames, FLAT_AFTER_FRAMES) if config.stream.window else frames
    from .pipeline import decoded_chunks  # the pipeline's own loop, so the prediction follows its order of work

    meter = LiveTensorBytes()
    with meter, fused_attention_on_meta(), torch.no_grad():
        with torch.device("meta"):
            model = CausalWanModel(model_cfg, compute_dtype=dtype)
        model = model.to(dtype).eval().requires_grad_(False)
        if fp8_matmul:
            model.use_fp8_matmul()
        elif fp8_weights:
            model.store_block_weights_in_fp8()
        dit_weights = meter.live
        with torch.device("meta"):
            vae = WanVAE(vae_cfg)
        # as the decode will run on this machine's GPU (conv2d where its cuDNN's conv3d is unreliable)
        unreliable = torch.cuda.is_available() and cudnn_conv3d_unreliable("cuda", dtype)
        vae = vae.to(dtype).eval().requires_grad_(False).set_conv_impl("conv2d" if unreliable else "conv3d")
        vae_weights = meter.live - dit_weights
        text = torch.empty(1, model_cfg.text_len, model_cfg.text_dim, device="meta", dtype=dtype)
        decoder = TiledDecoder.overlapping_by_a_quarter(vae, tile) if tile else vae

        def run(work) -> int:
            base = meter.live
            meter.reset_peak()
            work()
            return meter.peak - base

        from .sampler import stream_video
        between: list[int] = []

        def denoise() -> None:
            for _ in stream_video(model, text, width, height, frames, config, seed=0):
                between.append(meter.live)

        denoise_peak = run(denoise)
        dit_caches = max(between) - meter.live
        latent = torch.empty(1, vae_cfg.z_dim, (frames - 1) // vae_cfg.temporal_factor + 1,
                             height // vae_cfg.spatial_factor, width // vae_cfg.spatial_factor, device="meta",
                             dtype=dtype)
        step = config.stream.chunk_frames
        pieces = [latent[:, :, i:i + step] for i in range(0, latent.shape[2], step)]
        decode_peak = run(lambda: _drain(decoder.decode_stream(iter(pieces))))

        def end_to_end_run(order: str) -> None:
            for _, video, _ in decoded_chunks(model, decoder, text, width, height, frames, config, 0, order=order):
                uint8_frames(video)  # the pipeline converts on the device, then hands the frames to the CPU

        end_to_end = {order: run(lambda order=order: end_to_end_run(order)) for order in orders}
    everything = dit_weights + vae_weights + text.nbytes
    return MemoryPrediction(dit_weights, dit_caches, dit_weights + denoise_peak, vae_weights,
                            vae_weights + decode_peak, {o: everything + p for o, p in end_to_end.items()}, frames)


__all__ = ["LiveTensorBytes", "fused_attention_on_meta", "MemoryPrediction", "predict_memory", "GIB"]
