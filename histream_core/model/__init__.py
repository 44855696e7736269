"""The Wan2.1 DiT made block-causal, its attention backends and its rotary embedding."""

from .attention import BACKENDS, AttentionBackendError, attention
from .wan import AttentionSettings, CausalWanModel, TextKV

__all__ = ["BACKENDS", "AttentionBackendError", "attention", "AttentionSettings", "CausalWanModel", "TextKV"]
