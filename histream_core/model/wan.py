"""CausalWanModel: the Wan2.1 text-to-video DiT, able to run block-causally over an explicit KV cache.

One ``forward`` serves two uses:
  * reference mode (``cache=None``): a whole latent video, bidirectional attention, as Wan2.1 itself;
  * chunk mode (``cache=KVCache``): one chunk of latent frames attends in full to itself and to the cached frames;
    with ``update_cache=True`` its own keys (after RoPE) and values are written into the cache at the chunk's
    temporal positions (the paper's timestep-0 cache pass). ``write_cache`` is that pass when only the cache is
    wanted, as in the sampler: it stops at the last block's K/V.
Module and parameter names equal the original Wan checkpoints (``norm3`` is the cross-attention norm, ``norm2``
the FFN norm). The residual stream and the 6-way modulation run in fp32; projections, attention and FFN run in
``compute_dtype``. Nothing here is inference-only: gradients flow through every output (cache writes are detached).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..cache import KVCache
from ..config import ModelConfig
from .attention import attention, check_backend
from .layers import (CastConv3d, CastLinear, Fp8Linear, FP32LayerNorm, RMSNorm, check_fp8_matmul, gelu_mlp,
                     shared_input, store_weight_in_fp8)
from .rope import apply_rope, rope_angles, rope_cos_sin


def timestep_sinusoid(freq_dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's sinusoidal timestep embedding: [cos, sin] halves, computed in float64.  # [N] -> [N, freq_dim]"""
    half = freq_dim // 2
    position = timesteps.to(torch.float64)
    frequencies = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    sinusoid = torch.outer(position, frequencies)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-frame modulation.  x # [B, F, S, C]; shift, scale # [B, F, C]"""
    return x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)


@dataclass(frozen=True)
class TextKV:
    """Cross-attention keys and values of the text, per block, computed once per prompt."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per block (k, v)  # [B, text_len, heads, head_dim]


@dataclass(frozen=True)
class AttentionSettings:
    """Per-call attention knobs: backend, HD-inference RoPE factors (t, h, w) and softmax logit multiplier."""

    backend: str = "sdpa"
    rope_factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    logit_scale: float = 1.0


class _Projections(nn.Module):
    """q, k, v, o projections and the q/k RMSNorms (across heads) that Wan's self- and cross-attention share."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (CastLinear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_Projections):
    def kv(self, x, cos, sin):
        """x # [B, L, C] in compute dtype -> (k after RoPE, v) # [B, L, heads, head_dim]"""
        x = shared_input(x, self.k)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        return k, self.v(x).unflatten(-1, (self.num_heads, -1))

    def forward(self, x, cos, sin, cached, settings: AttentionSettings):
        """x # [B, L, C] in compute dtype -> (out # [B, L, C], (k, v) of these tokens after RoPE)."""
        x = shared_input(x, self.q)  # fp8 matmul: quantized once for q, k and v
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        k, v = self.kv(x, cos, sin)
        k_all, v_all = (k, v) if cached is None else (torch.cat([cached[0], k], 1), torch.cat([cached[1], v], 1))
        out = attention(q, k_all, v_all, settings.backend, settings.logit_scale)
        return self.o(out.flatten(2)), (k, v)


class CrossAttention(_Projections):
    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context # [B, text_len, C] (embedded text, compute dtype) -> (k, v) # [B, text_len, heads, head_dim]"""
        context = shared_input(context, self.k)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x, kv, backend: str):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k, v = (t.expand(q.shape[0], -1, -1, -1) for t in kv)  # one prompt may serve a batch
        return self.o(attention(q, k, v, backend).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = (FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
                      if cfg.cross_attn_norm else nn.Identity())
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = gelu_mlp(cfg.dim, cfg.ffn_dim, cfg.dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, frames, cos, sin, text_kv, cached, settings, compute_dtype):
        """x # [B, L, C] fp32 residual stream; e # [B, F, 6, C] fp32 time projection, one row per frame."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float().unsqueeze(0) + e).unbind(2)
        per_frame = lambda t: t.unflatten(1, (frames, -1))  # noqa: E731  [B, L, C] -> [B, F, S, C]

        h = self._self_attn_input(x, frames, shift_sa, scale_sa, compute_dtype)
        y, new_kv = self.self_attn(h, cos, sin, cached, settings)
        x = x + (per_frame(y.float()) * gate_sa.unsqueeze(2)).flatten(1, 2)

        x = x + self.cross_attn(self.norm3(x).to(compute_dtype), text_kv, settings.backend).float()

        h = modulate(per_frame(self.norm2(x)), shift_ff, scale_ff).flatten(1, 2)
        y = self.ffn(h.to(compute_dtype))
        x = x + (per_frame(y.float()) * gate_ff.unsqueeze(2)).flatten(1, 2)
        return x, new_kv

    def kv(self, x, e, frames, cos, sin, compute_dtype):
        """Only this block's self-attention (k, v) of x: all a cache pass needs from the last block."""
        shift_sa, scale_sa = (self.modulation[:, :2].float().unsqueeze(0) + e[:, :, :2]).unbind(2)
        return self.self_attn.kv(self._self_attn_input(x, frames, shift_sa, scale_sa, compute_dtype), cos, sin)

    def _self_attn_input(self, x, frames, shift, scale, compute_dtype):
        """norm1 of the residual stream, modulated per frame, in compute dtype.  # [B, L, C]"""
        return modulate(self.norm1(x).unflatten(1, (frames, -1)), shift, scale).flatten(1, 2).to(compute_dtype)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = CastLinear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, frames, compute_dtype):
        """x # [B, L, C] fp32; e # [B, F, C] fp32 time embedding -> # [B, L, out*prod(patch)]"""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        h = modulate(self.norm(x).unflatten(1, (frames, -1)), shift, scale).flatten(1, 2)
        return self.head(h.to(compute_dtype))


class CausalWanModel(nn.Module):
    """Wan2.1 T2V DiT. Output is the flow prediction v = eps - x0 (so x0 = x_t - sigma * v), in fp32."""

    def __init__(self, cfg: ModelConfig, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.patch_embedding = CastConv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = gelu_mlp(cfg.text_dim, cfg.dim, cfg.dim)
        self.time_embedding = nn.Sequential(CastLinear(cfg.freq_dim, cfg.dim), nn.SiLU(), CastLinear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), CastLinear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def compile_blocks(self, mode: str | None = None) -> "CausalWanModel":
        """torch.compile every transformer block with static shapes (CUDA; a large win from fused elementwise work).

        With the sliding window every chunk after the second has the same shapes, so a video needs only a handful
        of graphs (low/high resolution x cache sizes x cache pass); dynamo's cache limit (a process-wide setting) is
        raised to at least 64 to hold them.
        Calls made with ``compiled=False`` (a short last chunk, a recache run) use the eager blocks instead of
        compiling a graph they would use once. The compiled callables are kept outside the module tree, so the
        state dict and parameters are unchanged.
        """
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.__dict__["_compiled_blocks"] = [torch.compile(block, dynamic=False, mode=mode) for block in self.blocks]
        return self

    def use_fp8_matmul(self) -> "CausalWanModel":
        """Multiply in fp8 in every transformer block's linear layers (``Fp8Linear``): inference only, bf16 compute.

        The speed option of the real-time (16 fps at 1080p) budget: at 1080p the blocks' GEMMs are about a fifth of the
        compiled denoising time, and fp8 tensor cores run them at about twice the bf16 rate. The embeddings, the
        modulation path and the head stay as they are (small, and fp32 where Wan keeps it). Weights are quantized
        here, once (about half their memory); call it before ``compile_blocks``. Off by default: it moves x0 (see
        benchmarks/quality_delta.py, variant fp8-matmul).
        """
        if self.compute_dtype != torch.bfloat16:
            raise ValueError(f"fp8 matmul needs the bf16 compute dtype, this model computes in {self.compute_dtype}: "
                             "load it with compute dtype bf16 (CLI --dtype bf16, HiStream Loader compute_dtype bf16)")
        if self.is_compiled:
            raise ValueError("call use_fp8_matmul before compile_blocks (the compiled blocks hold the old layers)")
        check_fp8_matmul(self.patch_embedding.weight.device)
        for block in self.blocks:
            for name, module in list(block.named_modules()):
                if isinstance(module, CastLinear):
                    parent, _, attr = name.rpartition(".")
                    setattr(block.get_submodule(parent), attr, Fp8Linear.from_linear(module))
        return self

    @property
    def uses_fp8_matmul(self) -> bool:
        return isinstance(self.blocks[0].ffn[0], Fp8Linear)

    def store_block_weights_in_fp8(self) -> "CausalWanModel":
        """Keep the blocks' linear weights as e4m3 with a scale per output channel, upcast per call: what loading
        with weight_dtype fp8 gives (the loader quantizes tensor by tensor as it reads them)."""
        for layer in self.blocks.modules():
            if isinstance(layer, CastLinear):
                store_weight_in_fp8(layer)
        return self

    @property
    def stores_block_weights_in_fp8(self) -> bool:
        return self.blocks[0].ffn[0].weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    @property
    def is_compiled(self) -> bool:
        return bool(self.__dict__.get("_compiled_blocks"))

    # -- text -------------------------------------------------------------------------------------------------
    def encode_text(self, context: torch.Tensor) -> TextKV:
        """Embed text-encoder states and project them to every block's cross-attention K/V, once per prompt.

        context # [B, n_tokens <= text_len, text_dim]; zero-padded to text_len as Wan does.
        """
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text conditioning must be [batch, tokens, {self.cfg.text_dim}] for this model, got "
                             f"{tuple(context.shape)}: use the text encoder this checkpoint was trained with "
                             "(umT5-XXL)")
        if context.shape[1] == 0:
            raise ValueError("text conditioning is empty (0 tokens): encode a prompt with the Wan text encoder first")
        if context.shape[1] > self.cfg.text_len:
            raise ValueError(f"text conditioning has {context.shape[1]} tokens, the model takes at most "
                             f"{self.cfg.text_len}: keep the first {self.cfg.text_len} (umT5 encoders cut prompts "
                             "there)")
        pad = context.new_zeros(context.shape[0], self.cfg.text_len - context.shape[1], context.shape[2])
        param = next(self.parameters())
        embedded = self.text_embedding(torch.cat([context, pad], 1).to(param.device, self.compute_dtype))
        return TextKV(tuple(block.cross_attn.text_kv(embedded) for block in self.blocks))

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: TextKV | torch.Tensor,
        *,
        cache: KVCache | None = None,
        frame_start: int = 0,
        update_cache: bool = False,
        settings: AttentionSettings = AttentionSettings(),
        compiled: bool = True,
    ) -> torch.Tensor:
        """Predict the flow v for latent frames ``x`` at temporal positions frame_start, frame_start+1, ...

        x # [B, in_dim, F, H, W]; timestep # [B] or [B, F] in 0..1000 (one per frame allowed);
        text: TextKV from ``encode_text`` (reuse it across calls) or raw text states.
        cache: frames this chunk attends to besides itself; ``update_cache`` writes this chunk's K/V into it.
        compiled: use the compiled blocks if ``compile_blocks`` was called (False: eager, for one-off shapes).
        Returns v # [B, out_dim, F, H, W] float32.
        """
        if update_cache and cache is None:
            raise ValueError("update_cache=True needs a cache to write into")
        x_tok, e, grid = self._run_blocks(x, timestep, text, cache, frame_start, update_cache, settings, compiled,
                                          last_block_kv_only=False)
        out = self.head(x_tok, e, grid[0], self.compute_dtype).float()
        return self._unpatchify(out, grid)

    def write_cache(self, x: torch.Tensor, timestep: torch.Tensor, text: TextKV | torch.Tensor, *, cache: KVCache,
                    frame_start: int = 0, settings: AttentionSettings = AttentionSettings(),
                    compiled: bool = True) -> None:
        """The timestep-0 cache pass when its output is not wanted: writes into ``cache`` exactly the K/V that
        ``forward(..., update_cache=True)`` writes, without the work only the output needs (the last block's
        attention, cross-attention and FFN, and the head: about 1/num_layers of the call)."""
        self._run_blocks(x, timestep, text, cache, frame_start, True, settings, compiled, last_block_kv_only=True)

    def _rope_tables(self, grid, frame_start, factors, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin of a call's token grid (fp32), kept for the next calls: a chunk's calls share them, and
        older positions are never asked for again, so the last 8 are kept. They live on the model (outside its state
        dict), so they go with it: a process-wide cache held ~100 MB of GPU tables at 1080p after the model was
        unloaded."""
        key = (grid, frame_start, factors, device)
        tables = self.__dict__.setdefault("_rope_table_cache", OrderedDict())
        if key in tables:
            tables.move_to_end(key)
        else:
            if len(tables) >= 8:
                tables.popitem(last=False)
            cfg = self.cfg
            tables[key] = rope_cos_sin(rope_angles(grid, cfg.rope_split, frame_start, cfg.rope_theta, factors, device),
                                       torch.float32)
        return tables[key]

    def _run_blocks(self, x, timestep, text, cache, frame_start, update_cache, settings, compiled,
                    last_block_kv_only):
        """Embed, run the blocks (writing K/V if asked) -> (residual stream # [B, L, C], e, token grid)."""
        cfg = self.cfg
        check_backend(settings.backend)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents must be [batch, {cfg.in_dim}, frames, height, width], got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size {cfg.patch_size}")
        text_kv = text if isinstance(text, TextKV) else self.encode_text(text)

        tokens = self.patch_embedding(x.to(self.compute_dtype))  # [B, C, F', H', W']
        grid = tuple(tokens.shape[2:])
        frames, tokens_per_frame = grid[0], grid[1] * grid[2]
        x_tok = tokens.flatten(2).transpose(1, 2).float()  # [B, L, C]

        e, e_proj = self._time_embedding(timestep, x.shape[0], frames)
        cos, sin = self._rope_tables(grid, frame_start, tuple(float(f) for f in settings.rope_factors), x.device)
        # A cache pass stores each block's K/V as soon as it exists; other calls drop them with the block.
        writing = cache.begin_write(list(range(frame_start, frame_start + frames)), tokens_per_frame) \
            if update_cache else None
        blocks = self.__dict__["_compiled_blocks"] if compiled and self.is_compiled else self.blocks
        last = len(blocks) - 1
        for index, block in enumerate(blocks):
            if last_block_kv_only and index == last:
                kv = self.blocks[index].kv(x_tok, e_proj, frames, cos, sin, self.compute_dtype)
            else:
                cached = cache.layer(index) if cache is not None else None
                x_tok, kv = block(x_tok, e_proj, frames, cos, sin, text_kv.layers[index], cached, settings,
                                  self.compute_dtype)
            if writing is not None:
                writing.layer(index, *kv)
        if writing is not None:
            writing.finish()
        return x_tok, e, grid

    def _time_embedding(self, timestep: torch.Tensor, batch: int, frames: int):
        """-> e # [B, F, C] (time embedding) and e_proj # [B, F, 6, C] (block modulation), both fp32."""
        t = timestep.reshape(batch, -1) if timestep.ndim else timestep.reshape(1, 1).expand(batch, 1)
        if t.shape[1] not in (1, frames):
            raise ValueError(f"timestep must be one per sample or one per latent frame ({frames}), got "
                             f"{tuple(timestep.shape)}")
        t = t.expand(batch, frames)
        param_device = self.patch_embedding.weight.device
        e = self.time_embedding(timestep_sinusoid(self.cfg.freq_dim, t.flatten().to(param_device)).float())
        e_proj = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        return e.unflatten(0, (batch, frames)), e_proj.unflatten(0, (batch, frames))

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """# [B, F'*H'*W', pt*ph*pw*C] -> [B, C, F'*pt, H'*ph, W'*pw]"""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(out.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)
