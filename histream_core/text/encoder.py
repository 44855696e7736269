"""Prompts -> umT5 states for the DiT, with an on-disk cache so that repeated prompts skip the 11 GB encoder.

Output semantics (Wan2.1's ``T5EncoderModel.__call__``): one tensor per prompt # [1, n_tokens, dim], fp32 on the
CPU, n_tokens <= text_len (512) with ``</s>`` included and no padding; the DiT's ``encode_text`` zero-pads to 512
itself, which equals ComfyUI's padded-and-zeroed output. Prompts are batched with a padding mask; the mask makes each
prompt's states independent of the batch.

Cache: ``<cache_dir>/<key>.safetensors`` holding ``{"context": states}`` (so a cache file is also a valid
``--text-embeds`` file), key = sha256 of the prompt, the encoder file's identity (resolved path, size, mtime: hashing
11 GB would cost more than encoding), the tokenizer's sha256, the dtype and the token limit.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import EXPECTED_ENCODER, EXPECTED_TOKENIZER, TextEncoderError
from .tokenizer import UMT5Tokenizer
from .umt5 import UMT5Encoder
from .weights import default_dtype, load_umt5_encoder, read_embedded_tokenizer

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/histream/text")
BATCH_SIZE = 8  # prompts per encoder call; bounds the [batch, heads, L, L] attention bias memory
_CACHE_FORMAT = 1  # bump when the encoder's numerics change, so old cache files stop matching


@dataclass(frozen=True)
class EncodedPrompt:
    states: torch.Tensor  # [1, n_tokens, dim] fp32 on the CPU, </s> included, no padding
    dropped: int  # tokens cut off by truncation (0: the whole prompt fits)


def encode_prompts(model: UMT5Encoder, tokenizer: UMT5Tokenizer, prompts: Sequence[str]) -> list[EncodedPrompt]:
    """Encode ``prompts`` in one padded, masked batch; each result is trimmed to its own tokens."""
    if not prompts:
        return []
    cfg = model.cfg
    tokens = [tokenizer(prompt, cfg.text_len) for prompt in prompts]
    top = max(max(t.ids) for t in tokens)
    if top >= cfg.vocab_size:
        raise TextEncoderError(f"the tokenizer '{tokenizer.source}' gives token id {top}, beyond the encoder's "
                               f"vocabulary of {cfg.vocab_size}: the two files do not belong together.\n"
                               f"What to do: use {EXPECTED_TOKENIZER}, with {EXPECTED_ENCODER}.")
    length = max(len(t.ids) for t in tokens)
    ids = torch.full((len(tokens), length), tokenizer.pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros(len(tokens), length, dtype=torch.bool)  # [B, L], True on real tokens
    for row, t in enumerate(tokens):
        ids[row, :len(t.ids)] = torch.tensor(t.ids)
        mask[row, :len(t.ids)] = True
    device = model.token_embedding.weight.device
    with torch.no_grad():
        states = model(ids.to(device), mask.to(device))  # [B, L, dim]
    return [EncodedPrompt(states[row:row + 1, :len(t.ids)].float().cpu(), t.dropped) for row, t in enumerate(tokens)]


class TextEncoder:
    """Prompt -> umT5 states # [1, n_tokens, dim], cached on disk; the encoder loads only on a cache miss.

    Load, encode every prompt, free, then sample (the encoder and the DiT need not share the GPU):
        with TextEncoder("umt5_xxl_fp16.safetensors", "google/umt5-xxl", device="cuda") as text:
            contexts = text.encode_all(prompts)
        # the encoder is freed here; contexts are fp32 CPU tensors for CausalWanModel.encode_text
    tokenizer_path: tokenizer.json, spiece.model or a folder of either; None = the sentencepiece model that ComfyUI
        embeds in some umt5 files (an error names what to pass if there is none).
    dtype: None = bf16 on CUDA, fp32 elsewhere. cache_dir: None turns the cache off.
    """

    def __init__(self, encoder_path: str | Path, tokenizer_path: str | Path | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 cache_dir: str | Path | None = DEFAULT_CACHE_DIR, text_len: int = 512) -> None:
        self.encoder_path = Path(encoder_path)
        if not self.encoder_path.is_file():
            what = "is a folder, not a file" if self.encoder_path.is_dir() else "does not exist"
            raise TextEncoderError(f"text encoder file '{self.encoder_path}' {what}.\n"
                                   f"What to do: point at {EXPECTED_ENCODER}.")
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.text_len = text_len
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.tokenizer = self._tokenizer(tokenizer_path)
        stat = self.encoder_path.stat()
        self._identity = json.dumps({
            "format": _CACHE_FORMAT, "encoder": [str(self.encoder_path.resolve()), stat.st_size, stat.st_mtime_ns],
            "tokenizer": self.tokenizer.identity, "dtype": str(self.dtype), "text_len": text_len})
        self._model: UMT5Encoder | None = None

    def _tokenizer(self, tokenizer_path: str | Path | None) -> UMT5Tokenizer:
        if tokenizer_path is not None:
            return UMT5Tokenizer.from_file(tokenizer_path)
        embedded = read_embedded_tokenizer(self.encoder_path)
        if embedded is None:
            raise TextEncoderError(f"no tokenizer given, and '{self.encoder_path}' does not embed one.\n"
                                   f"What to do: pass {EXPECTED_TOKENIZER}.")
        return UMT5Tokenizer.from_sentencepiece_bytes(embedded, f"{self.encoder_path} (embedded spiece_model)")

    # -- encoding -----------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> torch.Tensor:
        """The states of one prompt # [1, n_tokens, dim], fp32 on the CPU."""
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The states of each prompt, in order; cache misses are encoded in batches, then cached."""
        found: dict[str, EncodedPrompt] = {}
        for prompt in dict.fromkeys(prompts):
            hit = self._read_cache(prompt)
            if hit is not None:
                found[prompt] = hit
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        if missing:
            model = self._load()
            for start in range(0, len(missing), BATCH_SIZE):
                batch = missing[start:start + BATCH_SIZE]
                for prompt, encoded in zip(batch, encode_prompts(model, self.tokenizer, batch)):
                    found[prompt] = encoded
                    self._write_cache(prompt, encoded)
        log.info("text: %d prompt(s), %d from the cache", len(found), len(found) - len(missing))
        return [found[prompt].states for prompt in prompts]

    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([prompt, self._identity]).encode("utf-8")).hexdigest()

    # -- memory -------------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """Whether the encoder weights are in memory (only after a cache miss, until ``free``)."""
        return self._model is not None

    def _load(self) -> UMT5Encoder:
        if self._model is None:
            self._model = load_umt5_encoder(self.encoder_path, dtype=self.dtype, device=self.device,
                                            text_len=self.text_len)
        return self._model

    def free(self) -> None:
        """Drop the encoder (if it was loaded) and return its memory, before the DiT samples."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("text encoder freed")

    def __enter__(self) -> "TextEncoder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.free()

    # -- cache --------------------------------------------------------------------------------------------------
    def _cache_file(self, prompt: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{self.cache_key(prompt)}.safetensors"

    def _read_cache(self, prompt: str) -> EncodedPrompt | None:
        path = self._cache_file(prompt)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                states, dropped = handle.get_tensor("context"), int(handle.metadata()["dropped"])
        except Exception as exc:  # a damaged cache file is re-encoded and overwritten, never fatal
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None
        if dropped:
            log.warning("prompt cut to %d tokens: its last %d tokens were dropped. Prompt: %.60s...",
                        self.text_len, dropped, prompt)
        return EncodedPrompt(states, dropped)

    def _write_cache(self, prompt: str, encoded: EncodedPrompt) -> None:
        path = self._cache_file(prompt)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        except OSError as exc:  # the cache only saves time: the run goes on without it
            log.warning("cannot write the prompt cache in %s (%s): the prompt will be encoded again next time; "
                        "choose a writable folder (CLI --text-cache DIR, Python cache_dir=)", path.parent,
                        exc.strerror or exc)
            return
        os.close(handle)
        try:  # write then rename, so that a crash never leaves a half-written file under the key
            save_file({"context": encoded.states.contiguous()}, temporary,
                      metadata={"dropped": str(encoded.dropped), "prompt": prompt})
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


__all__ = ["DEFAULT_CACHE_DIR", "EncodedPrompt", "TextEncoder", "encode_prompts"]
