"""The one error type of the text package, and what to tell users about the files Wan2.1 expects."""

from __future__ import annotations

EXPECTED_ENCODER = ("the umT5-XXL encoder Wan2.1 uses: ComfyUI's umt5_xxl_fp16.safetensors or "
                    "umt5_xxl_fp8_e4m3fn_scaled.safetensors (models/text_encoders), Wan2.1's "
                    "models_t5_umt5-xxl-enc-bf16.pth, or a transformers UMT5EncoderModel state dict")
EXPECTED_TOKENIZER = ("the google/umt5-xxl tokenizer: its tokenizer.json or spiece.model (Wan2.1's model folder ships "
                      "them in google/umt5-xxl/), or a folder holding either")


class TextEncoderError(ValueError):
    """A text-encoder or tokenizer file that cannot be used; the message names the file and says what to do."""
