"""Text conditioning outside ComfyUI (ComfyUI users encode prompts with the host's ``wan`` text encoder).

Two ways in: precomputed umT5 states from a file (``load_text_embeddings``), or the standalone umT5-XXL encoder
(``TextEncoder``: the user's umt5 weights and tokenizer files, with an on-disk cache of encoded prompts).
"""

from .embeddings import load_text_embeddings
from .encoder import DEFAULT_CACHE_DIR, EncodedPrompt, TextEncoder, encode_prompts
from .errors import TextEncoderError
from .tokenizer import Tokens, UMT5Tokenizer
from .umt5 import UMT5_PRESETS, UMT5Config, UMT5Encoder
from .weights import load_umt5_encoder, read_embedded_tokenizer

__all__ = [
    "DEFAULT_CACHE_DIR", "EncodedPrompt", "TextEncoder", "TextEncoderError", "Tokens", "UMT5Config", "UMT5Encoder",
    "UMT5Tokenizer", "UMT5_PRESETS", "encode_prompts", "load_text_embeddings", "load_umt5_encoder",
    "read_embedded_tokenizer",
]
