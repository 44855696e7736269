"""The umT5 tokenizer, read from a local file the user points at; nothing is ever downloaded.

Files: ``tokenizer.json`` (read with ``tokenizers``), ``spiece.model`` (read with ``sentencepiece``), a folder holding
either (Wan2.1's ``google/umt5-xxl/``), or the sentencepiece bytes that ComfyUI embeds in its umt5 files.

Tokenization follows Wan2.1 (``HuggingfaceTokenizer(seq_len=512, clean='whitespace')``): HTML entities unescaped twice,
whitespace runs collapsed, the text stripped; its pieces, then ``</s>``. A prompt longer than ``max_tokens`` keeps its
first ``max_tokens - 1`` pieces plus ``</s>`` (transformers' truncation) and the cut is reported. Wan also runs
``ftfy.fix_text``, which only repairs mis-decoded (mojibake) text; it is not a dependency here.
"""

from __future__ import annotations

import hashlib
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import EXPECTED_TOKENIZER, TextEncoderError

log = logging.getLogger(__name__)

FOLDER_FILES = ("tokenizer.json", "spiece.model")  # looked for, in this order, in a folder
EOS, PAD = "</s>", "<pad>"


@dataclass(frozen=True)
class Tokens:
    """A tokenized prompt: ids with ``</s>`` last, and how many pieces truncation cut off (0: none)."""

    ids: list[int]
    dropped: int


def clean_prompt(text: str) -> str:
    """Wan2.1's 'whitespace' cleaning, less ftfy: unescape HTML entities twice, collapse whitespace, strip."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5Tokenizer:
    """Text -> umT5 token ids. Build it with ``from_file`` or ``from_sentencepiece_bytes``."""

    def __init__(self, encode: Callable[[str], list[int]], eos_id: int, pad_id: int, identity: str,
                 source: str) -> None:
        self._encode = encode
        self.eos_id, self.pad_id = eos_id, pad_id
        self.identity = identity  # sha256 of the tokenizer's bytes: part of the embedding cache key
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> "UMT5Tokenizer":
        """Read ``tokenizer.json``, a sentencepiece ``.model``, or a folder holding one of them."""
        path = Path(path)
        if path.is_dir():
            found = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
            if found is None:
                raise _error(f"no tokenizer in the folder '{path}': it holds neither {' nor '.join(FOLDER_FILES)}")
            path = found
        if not path.is_file():
            raise _error(f"tokenizer file '{path}' does not exist")
        data = path.read_bytes()
        if path.suffix.lower() == ".json":
            return cls._from_tokenizer_json(data, str(path))
        if path.suffix.lower() == ".model":
            return cls.from_sentencepiece_bytes(data, str(path))
        raise _error(f"'{path}' is not a tokenizer file (expected tokenizer.json or a sentencepiece .model)")

    @classmethod
    def _from_tokenizer_json(cls, data: bytes, source: str) -> "UMT5Tokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise TextEncoderError(f"reading {source} needs the 'tokenizers' package: pip install tokenizers") from exc
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # JSON or schema errors: a truncated or foreign file
            raise _error(f"cannot read the tokenizer '{source}' ({type(exc).__name__}: {exc}): it is truncated or "
                         "not a tokenizers file") from exc
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise _error(f"the tokenizer '{source}' has no '{EOS}' token, so it is not the umT5 tokenizer")
        pad = tokenizer.token_to_id(PAD)
        return cls(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, eos,
                   0 if pad is None else pad, hashlib.sha256(data).hexdigest(), source)

    @classmethod
    def from_sentencepiece_bytes(cls, data: bytes, source: str) -> "UMT5Tokenizer":
        """A sentencepiece model given as bytes (a spiece.model file's, or ComfyUI's embedded ``spiece_model``)."""
        try:
            import sentencepiece
        except ImportError as exc:
            raise TextEncoderError(f"reading {source} needs the 'sentencepiece' package: pip install sentencepiece"
                                   ) from exc
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except Exception as exc:  # a truncated or foreign file
            raise _error(f"cannot read the sentencepiece model '{source}' ({type(exc).__name__}: {exc}): it is "
                         "truncated or not a sentencepiece model") from exc
        if processor.eos_id() < 0:
            raise _error(f"the sentencepiece model '{source}' has no end-of-sequence piece, so it is not the umT5 "
                         "tokenizer")
        return cls(lambda text: processor.encode(text, out_type=int), processor.eos_id(), max(processor.pad_id(), 0),
                   hashlib.sha256(data).hexdigest(), source)

    def __call__(self, prompt: str, max_tokens: int) -> Tokens:
        """Token ids of ``prompt``, ``</s>`` included, at most ``max_tokens`` of them."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 (room for '{EOS}'), got {max_tokens}")
        pieces = self._encode(clean_prompt(prompt))
        keep = max_tokens - 1
        dropped = max(0, len(pieces) - keep)
        if dropped:
            log.warning("prompt cut to %d tokens (the encoder's limit): its last %d tokens are dropped. "
                        "Prompt: %.60s...", max_tokens, dropped, prompt)
        return Tokens(pieces[:keep] + [self.eos_id], dropped)


def _error(problem: str) -> TextEncoderError:
    return TextEncoderError(f"{problem}.\nWhat to do: point at {EXPECTED_TOKENIZER}.")


__all__ = ["Tokens", "UMT5Tokenizer", "clean_prompt"]
