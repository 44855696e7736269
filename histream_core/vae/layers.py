"""Building blocks of the Wan2.1 VAE, written for streaming over time.

Every module whose output at frame ``t`` depends on earlier frames takes a :class:`CausalPass`, which hands it the
cache it left at the end of the previous pass and collects the new one. Nothing is stored on the modules, so the
same VAE can stream any number of videos (or spatial tiles) at once, each with its own state.

Parameter names follow the original Wan checkpoint (``residual.0.gamma``, ``residual.2.weight``, ``resample.1``,
``time_conv``, ...), so ``Wan2.1_VAE.pth`` and ComfyUI's ``wan_2.1_vae.safetensors`` load without renaming.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalPass:
    """The temporal caches of one forward pass over consecutive frames of a stream.

    Modules call :meth:`take` for the cache they wrote in the previous pass (``None`` at the start of a stream) and
    :meth:`give` their new one, in a fixed call order; :meth:`result` returns the new caches for the next pass.

    ``first_frame`` is True for the pass holding only the video's first frame: Wan encodes and decodes that frame
    on its own (it maps to one latent frame, the others to ``temporal_factor`` frames each), so the temporal
    resampling layers skip their time convolution on it.
    """

    def __init__(self, caches: tuple[torch.Tensor | None, ...] | None, first_frame: bool) -> None:
        # A list, emptied slot by slot as layers take their cache: a cache nobody else holds (those of the previous
        # pass inside one decode call) is freed as soon as its layer has used it, so a pass holds about one set of
        # caches instead of two (9 GiB less at 1080p in bf16).
        self._old = None if caches is None else list(caches)
        self._new: list[torch.Tensor | None] = []
        self.first_frame = first_frame

    def take(self) -> torch.Tensor | None:
        if self._old is None:
            return None
        index = len(self._new)
        assert index < len(self._old), "more cached layers called than the state holds"
        cache, self._old[index] = self._old[index], None
        return cache

    def give(self, cache: torch.Tensor | None) -> None:
        self._new.append(cache)

    def result(self) -> tuple[torch.Tensor | None, ...]:
        assert self._old is None or len(self._old) == len(self._new), "state and network disagree on cache count"
        return tuple(self._new)


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``x`` is laid out in: channels_last_3d (NDHWC) or the default (NCDHW).

    The decoder's activations keep the layout its input comes in (see ``WanVAE.set_channels_last``): buffers are
    allocated in it, so the convolutions never receive a tensor they must convert first.
    """
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def cudnn_conv3d_unreliable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether PyTorch's half-precision conv3d on ``device`` would run on cuDNN 9.8-9.14, which gives wrong results
    for some large 3D convolutions (pytorch#163539); PyTorch 2.9 works around it by sending every such conv to a
    slow fallback that needs more memory (pytorch#163581, #166643); cuDNN 9.15 fixed it. The causal convs then run
    as conv2d instead (``CausalConv3d`` with ``conv_impl`` "auto")."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return 90800 <= (torch.backends.cudnn.version() or 0) < 91500


def _empty_like_layout(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout_of(x))


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time only on the past (``2 * padding_t`` frames), as Wan's ``CausalConv3d``.

    Called with a :class:`CausalPass`, the past frames are the last ones of the previous pass (zeros at the start
    of the stream), so a video fed in pieces gives exactly the output of the video fed whole.
    Kernels with no temporal extent (1x1x1) need no cache and are called without a pass.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pad_t, pad_h, pad_w = self.padding
        self.history = 2 * pad_t  # past frames each output frame sees beyond its own
        self.padding = (0, pad_h, pad_w)  # spatial padding stays inside the conv; time is handled here
        self.conv_impl = "auto"  # see WanVAE.set_conv_impl

    def forward(self, x: torch.Tensor, stream: CausalPass | None = None) -> torch.Tensor:  # [B, C, T, H, W]
        if self.history == 0:
            return self._convolve(x)
        assert stream is not None, "a temporal causal conv needs a CausalPass"
        b, c, t, h, w = x.shape
        padded = _empty_like_layout(x, b, c, self.history + t, h, w)  # = cat([past or zeros, x]) in x's layout
        self._fill_past(padded, stream)
        padded[:, :, self.history:].copy_(x)
        stream.give(padded[:, :, -self.history:].clone())  # clone: a view would keep the whole input alive
        return self._convolve(padded)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution (the temporal padding already in ``x``). On the CPU in fp32, PyTorch sends inputs below
        a size threshold to its naive im2col kernel (slow_conv3d); oneDNN's is 4-8x faster at the sizes of small
        VAEs (the embedded default's decode: 11.4 -> 2.8 s), the same up to float rounding."""
        if self._as_conv2d(x):
            return self._conv2d_per_frame_offset(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                                     self.dilation, self.groups)
        return super().forward(x)

    def _as_conv2d(self, x: torch.Tensor) -> bool:
        if self.kernel_size[0] == 1 or self.stride[0] != 1 or self.conv_impl == "conv3d":
            return False
        return self.conv_impl == "conv2d" or cudnn_conv3d_unreliable(x.device, x.dtype)

    def _conv2d_per_frame_offset(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution as a sum over the kernel's time offsets k of conv2d(frames t + k, weight[:, :, k]),
        each over all output frames at once. In channels-last layout with batch 1 the frames are read in place;
        NCDHW input is copied to frames-major once per offset. One output-sized temporary more than conv3d."""
        b, c, t_in, h, w = x.shape
        frames = x.transpose(1, 2)  # [B, T, C, H, W]
        t_out = t_in - self.kernel_size[0] + 1
        out = None
        for k in range(self.kernel_size[0]):
            window = frames[:, k:k + t_out].reshape(b * t_out, c, h, w)
            y = F.conv2d(window, self.weight[:, :, k], self.bias if k == 0 else None, self.stride[1:],
                         self.padding[1:], self.dilation[1:], self.groups)
            out = y if out is None else out.add_(y)
            del y, window  # before the next offset's conv: one output-sized temporary, not two
        return out.unflatten(0, (b, t_out)).transpose(1, 2)  # [B, C_out, T_out, H', W']

    def _fill_past(self, padded: torch.Tensor, stream: CausalPass) -> None:
        """Write the previous pass's last input frames (zeros at the start of a stream) before this pass's."""
        past = stream.take()
        if past is None:
            padded[:, :, :self.history].zero_()
        else:
            padded[:, :, :self.history].copy_(past)

    def forward_normed(self, handed: list[torch.Tensor], norm: RMSNorm, stream: CausalPass) -> torch.Tensor:
        """``self(silu(norm(x)), stream)`` for ``x = handed.pop()``, with less memory: silu(norm(x)) is written
        straight behind the cached past frames in the buffer the conv reads, and x is let go once read (the caller
        hands it over in a list and keeps no other reference if it has no further use for it). At 1080p each of
        the normalized copy and x is 1.5 GB that would otherwise be alive during the conv."""
        x = handed.pop()
        b, c, t, h, w = x.shape
        padded = _empty_like_layout(x, b, c, self.history + t, h, w)
        self._fill_past(padded, stream)
        norm.silu_into(x, padded[:, :, self.history:])
        del x
        stream.give(padded[:, :, -self.history:].clone())
        return self._convolve(padded)


class RMSNorm(nn.Module):
    """Wan's ``RMS_norm``: L2-normalize over channels, times sqrt(C) and a learned per-channel gain ``gamma``.

    ``images=True`` is for [N, C, H, W] inputs (attention), otherwise [B, C, T, H, W]. It normalizes in the input
    dtype, as Wan and ComfyUI do (in bf16, about 2 ulp from normalizing an fp32 copy): the copy and its quotient
    would be two full-size fp32 tensors, 6 GB of a 1080p decode pass. The result is never ``x`` itself, so the SiLU
    after it may work in place.

    ``compiled`` (set by ``WanVAE.compile_norms``) makes :meth:`silu_into` one compiled kernel instead of four
    passes over memory.
    """

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.compiled = False

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The normalized x, in ``out`` if given (a tensor of x's shape, e.g. a slice of a larger buffer)."""
        denominator = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)  # as F.normalize
        normed = x / denominator if out is None else torch.div(x, denominator, out=out)
        return normed.mul_(self.gamma.to(x.dtype) * self.scale)

    def silu_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Write SiLU(norm(x)) into ``out`` (a tensor of x's shape): the norm and SiLU before every causal conv.

        Eager, that is four passes over the activation (norm, divide, gain, SiLU; at 1080p about 2.8 of the 5.2 TB
        an 81-frame decode moves outside its convolutions); compiled, one kernel reads x and writes ``out`` once,
        rounding once instead of after each step.
        """
        if self.compiled:
            _compiled_norm_silu_into()(x, self.gamma.to(x.dtype) * self.scale, out)
        else:
            F.silu(self(x, out=out), inplace=True)


def _norm_silu_into(x: torch.Tensor, gain: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(F.silu(x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12) * gain))


@functools.cache
def _compiled_norm_silu_into():
    """One compiled function for every shape and layout (dynamic shapes: the decoder has a dozen of them)."""
    return torch.compile(_norm_silu_into, dynamic=True, fullgraph=True)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv 3x3x3 -> norm -> SiLU -> causal conv 3x3x3, plus a (1x1x1 conv) shortcut.

    ``residual`` keeps Wan's ``nn.Sequential`` indices (0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv)
    so parameter names match; index 5 is an identity because the VAE is only run for inference.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(inplace=True), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, stream: CausalPass) -> torch.Tensor:  # [B, C, T, H, W]
        # At 1080p every full-size activation is 1.5 GB in bf16: conv1's output is handed to conv2's step and freed
        # there, conv2's output takes the shortcut in place, and only x (for the shortcut) outlives its use.
        norm1, _, conv1, norm2, _, _, conv2 = self.residual  # the SiLUs run inside the norms' silu_into
        handed = [conv1.forward_normed([x], norm1, stream)]
        h = conv2.forward_normed(handed, norm2, stream)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, so no cache)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3 * c, h * w).transpose(1, 2)  # [B*T, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [B*T, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, HW, C]
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def _per_frame(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame.  # [B, C, T, H, W] -> [B, C', T, H', W']"""
    b, c, t, h, w = x.shape
    y = conv(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Downsample(nn.Module):
    """Encoder resampling: halve H and W (zero-pad right/bottom, 3x3 conv stride 2); optionally halve time.

    Time (``temporal=True``): the first frame passes through; after it, each output frame is a kernel-3,
    stride-2 causal conv over (previous input frame, two new frames). The cache is the last input frame, so
    passes after the first must bring an even number of frames.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, stream: CausalPass) -> torch.Tensor:  # [B, C, T, H, W]
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        past = stream.take()
        stream.give(x[:, :, -1:].clone())
        if stream.first_frame:
            assert x.shape[2] == 1, "the first pass holds only the first frame"
            return x
        assert past is not None and x.shape[2] % 2 == 0, "later passes bring an even number of frames"
        return self.time_conv(torch.cat([past, x], dim=2))


class Upsample(nn.Module):
    """Decoder resampling: double H and W (nearest, then 3x3 conv to dim // 2); optionally double time.

    Time (``temporal=True``): a causal kernel-3 conv makes 2*dim channels per frame, read as two frames.
    Wan does not double the first frame and starts the time conv's history at the second one (zeros before it).
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, stream: CausalPass) -> torch.Tensor:  # [B, C, T, H, W]
        if self.time_conv is not None:
            if stream.first_frame:
                stream.give(stream.take())  # leave the history empty: it starts after the first frame
            else:
                b, c, t, h, w = x.shape
                y = self.time_conv(x, stream)  # [B, 2C, T, H, W]: channel block k is output frame 2t + k
                x = _empty_like_layout(y, b, c, 2 * t, h, w)
                x[:, :, 0::2] = y[:, :c]
                x[:, :, 1::2] = y[:, c:]
                del y
        # Frame by frame into one output: the 4x upsampled input before the conv halves its channels is the
        # largest tensor of the decoder (3 GB for 4 frames at 1080p); one frame of it at a time is enough.
        b, c, t, h, w = x.shape
        out = _empty_like_layout(x, b, c // 2, t, 2 * h, 2 * w)
        for i in range(t):
            out[:, :, i] = self.resample(x[:, :, i])  # [B, C/2, 2H, 2W]
        return out


__all__ = ["layout_of", "cudnn_conv3d_unreliable", "CausalPass", "CausalConv3d", "RMSNorm", "ResidualBlock",
           "AttentionBlock", "Downsample", "Upsample"]
