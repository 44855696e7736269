"""Error messages that name the node, the input and the fix."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def input_error(node: str, name: str, message: str) -> ValueError:
    return ValueError(f"{node}, input '{name}': {message}")


@contextmanager
def out_of_memory_advice(width: int, height: int, advice: str) -> Iterator[None]:
    """Re-raise a CUDA out-of-memory error with what to change. The type stays the same, so ComfyUI still frees
    its models as it does after any OOM."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise torch.cuda.OutOfMemoryError(f"out of memory at {width}x{height}: {advice}") from exc
