"""Reading model weight files, shared by the Wan DiT loader (``checkpoints``) and the umT5 loader (``text.weights``).

Each loader keeps what is its own: the key layouts it detects, the renaming to its model's keys, the config it reads
from the shapes and the advice it gives. What they share is here:
  * ``open_weight_file``: ``.safetensors`` files are read through ``safetensors`` (the header alone gives shapes and
    dtypes; a tensor is read when its entry is loaded); ``.pt``/``.pth``/``.ckpt``/``.bin`` only through
    ``torch.load(weights_only=True)``, memory-mapped when the file is in torch's zip format, so no code in a file is
    ever run;
  * ComfyUI "scaled fp8": fp8 weights with a ``<module>.scale_weight`` (or ``.weight_scale``), real weight =
    weight * scale (``scaled_weight_key``, ``dequantize``); fp8-matmul input scales and quantization metadata are
    not weights (``DROPPED_SUFFIXES``);
  * ``require_keys``, ``check_fit``: the keys a config is read from, then one message listing every way the
    renamed tensors do not fit the model;
  * ``Unusable``: why a file cannot be used and what to do, which a loader turns into its own error (``message``).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import zipfile
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# safetensors header dtype -> torch dtype; any other dtype reads as None (reported as not supported)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # fp8-matmul input scales, quant metadata
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI scaled fp8: real weight = weight * scale


class Unusable(Exception):
    """Why a weight file cannot be used (``problem``) and what to do (``hint``; None: the loader's usual advice).

    Raised while a file is read and checked, before the loader names the file and the layouts it tried.
    """

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.hint = problem, hint

    def message(self, path: str | Path, as_what: str, layouts: Sequence[str], usual_hint: str,
                read_as: str | None = None) -> str:
        """The loader's error message: the file (read as what, if known), the problem, the layouts, what to do."""
        how = f" (read as {read_as})" if read_as else ""
        return (f"cannot load '{path}'{how} as {as_what}: {self.problem}.\n"
                f"Layouts tried: {'; '.join(layouts)}.\n"
                f"What to do: {self.hint or usual_hint}.")


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor, known by its header before it is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch has no name for, or a value that only has a shape
    load: Callable[[], torch.Tensor]

    @staticmethod
    def of(tensor: Any) -> TensorEntry:
        """The entry of a tensor already in memory, or of anything with a ``.shape`` (its dtype then None)."""
        return TensorEntry(tuple(tensor.shape), getattr(tensor, "dtype", None), lambda: tensor)


@dataclass(frozen=True)
class WeightFile:
    """An open weight file: its tensors as lazy entries, and where they were found."""

    container: str  # "safetensors" | "torch"
    source: str | None  # the entry of a torch file's dict that held the tensors (see ``nested``), if any
    entries: dict[str, TensorEntry]


def open_weight_file(path: Path, *, advice: str, error: Callable[[Unusable], Exception],
                     nested: Sequence[str] = ()) -> AbstractContextManager[WeightFile]:
    """Open ``path`` and give its tensors as lazy entries, within a ``with`` block (a safetensors file stays open).

    advice: what the loader always tells users (which file to pick), added to the hint of every problem found here.
    error: makes the loader's exception from an ``Unusable``; it is raised for a missing, unreadable or unsupported
    file, one holding Python objects besides tensors, or one that is not a dict of tensors.
    nested: names of entries of a torch file's dict that hold the state dict instead (training checkpoints), tried
    in this order; the first non-empty dict among them is read, else the file's dict itself.
    """
    try:
        return _open(path, nested)
    except Unusable as problem:
        hint = f"{problem.hint}; {advice}" if problem.hint else advice
        raise error(Unusable(problem.problem, hint)) from problem.__cause__


def _open(path: Path, nested: Sequence[str]) -> AbstractContextManager[WeightFile]:
    if path.is_dir():
        raise Unusable("it is a folder, not a file", "give the weights file inside it")
    if not path.is_file():
        raise Unusable("the file does not exist", "check the path")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # header or size errors: the file is truncated or not safetensors
            if is_host_out_of_memory(exc):
                raise  # not a bad file: the CLI gives it its own advice and exit status
            raise _misnamed(path) or _unreadable(exc) from exc
        return _safetensors_file(handle)
    if suffix in TORCH_SUFFIXES:
        return nullcontext(_torch_file(path, nested))
    raise Unusable(f"unsupported file type '{path.suffix}'",
                   f"use a {' / '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} file")


@contextmanager
def _safetensors_file(handle: Any) -> Iterator[WeightFile]:
    with handle:
        entries = {}
        for key in handle.keys():
            view = handle.get_slice(key)
            entries[key] = TensorEntry(tuple(view.get_shape()), SAFETENSORS_DTYPES.get(view.get_dtype()),
                                       lambda key=key: handle.get_tensor(key))
        yield WeightFile("safetensors", None, entries)


def is_host_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's allocator failing on the CPU."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
        text in str(exc) for text in ("can't allocate memory", "not enough memory")))


def load_torch_object(path: Path) -> Any:
    """torch.load that can only rebuild tensors and plain containers (weights_only), mmap'd for zip-format files.

    Raises Unusable with a short reason: torch's own message for a refused object would advise loading with
    weights_only=False, which would run the file's code."""
    try:
        with warnings.catch_warnings():  # old pickle protocols warn, uselessly here: the file is refused or read
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        if is_host_out_of_memory(exc):
            raise  # not a bad file
        # torch's wordings: "Unsupported global: GLOBAL x.y" and "unsupported GLOBAL x.y whose module x is blocked"
        refused = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if refused:
            raise Unusable(f"refused to unpickle {refused[1]}: the file holds Python objects besides tensors",
                           "only plain tensor files are read (torch.load weights_only=True), so no code in a file "
                           "can run; if you trust the file, re-save its state dict with torch.save or as "
                           ".safetensors") from exc
        raise _misnamed(path) or _unreadable(
            exc.__context__ if isinstance(exc.__context__, Exception) else exc) from exc


def _torch_file(path: Path, nested: Sequence[str]) -> WeightFile:
    obj = load_torch_object(path)
    if not isinstance(obj, Mapping):
        raise Unusable(f"the file holds a {type(obj).__name__}, not a dict of tensors")
    source = next((name for name in nested if isinstance(obj.get(name), Mapping) and obj[name]), None)
    state = obj[source] if source else obj
    not_tensors = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        where = (f"its '{source}' entry" if source else
                 f"it (with no non-empty {' / '.join(nested)} entry)" if nested else "it")
        raise Unusable(f"{where} is a dict whose entries are not all tensors: {few(not_tensors)}")
    if source:
        log.info("reading the tensors in the '%s' entry of %s", source, path.name)
    return WeightFile("torch", source, {key: TensorEntry.of(value) for key, value in state.items()})


def _misnamed(path: Path) -> Unusable | None:
    """A file whose content is the other container than its name says (a renamed download), told by its first
    bytes: safetensors starts with its header's length (8 bytes, little-endian) and '{'; torch.save with a zip
    ('PK') or a pickle (0x80) header."""
    with open(path, "rb") as file:
        head = file.read(9)
    is_safetensors = len(head) == 9 and head[8:9] == b"{"
    is_torch = head[:2] == b"PK" or head[:1] == b"\x80"
    named_safetensors = path.suffix.lower() in SAFETENSORS_SUFFIXES
    if named_safetensors and is_torch:
        return Unusable("it is a PyTorch (torch.save) file with a .safetensors name", "rename it to .pt")
    if not named_safetensors and is_safetensors:
        return Unusable(f"it is a safetensors file with a {path.suffix} name", "rename it to .safetensors")
    return None


def _unreadable(exc: Exception) -> Unusable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Unusable(f"the file could not be read ({type(exc).__name__}: {detail})",
                    "it is truncated, corrupt or not a weights file: download it again")


# -- scaled fp8 ---------------------------------------------------------------------------------------------------
def scaled_weight_key(key: str) -> str | None:
    """For a scaled-fp8 scale key (``<module>.scale_weight`` / ``.weight_scale``), the weight it scales, else None."""
    suffix = next((s for s in _SCALE_SUFFIXES if key.endswith(s)), None)
    return key[:-len(suffix)] + ".weight" if suffix else None


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI scaled fp8: weight * scale (one number, or one per output row), computed in fp32, into ``dtype``."""
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (weight.ndim - 1)))
    return (weight.float() * scale.float()).to(dtype)


# -- checks and messages ------------------------------------------------------------------------------------------
def require_keys(entries: Mapping[str, TensorEntry], keys: Sequence[str]) -> None:
    """Raise Unusable naming those of ``keys`` (the ones a model's shape is read from) that ``entries`` lacks."""
    absent = [key for key in keys if key not in entries]
    if absent:
        raise Unusable(f"{len(absent)} missing keys that the model's shape is read from: {few(absent)}")


def check_fit(model_state: Mapping[str, torch.Tensor], entries: Mapping[str, TensorEntry],
              scales: Mapping[str, TensorEntry], *, model: str, float_hint: str) -> None:
    """Raise Unusable unless ``entries`` (with their fp8 ``scales``, by weight key) load into ``model_state``.

    One message lists every missing, unexpected and wrong-shape key (scales included) against ``model`` (how the
    message names the model); only then are non-float (packed or quantized) weights refused, with ``float_hint``.
    ``model_state`` may be on the meta device: only shapes are compared.
    """
    expected = {key: tuple(value.shape) for key, value in model_state.items()}
    missing = [key for key in expected if key not in entries]
    unexpected = [key for key in entries if key not in expected]
    unexpected += [_scale_name(key) for key in scales if key not in entries]
    wrong = [f"{key} (file {list(entry.shape)}, model {list(expected[key])})"
             for key, entry in entries.items() if key in expected and entry.shape != expected[key]]
    wrong += [f"{_scale_name(key)} {list(scale.shape)} (must be one number or one per output row)"
              for key, scale in scales.items()
              if key in entries and math.prod(scale.shape) not in (1, entries[key].shape[0])]
    problems = [f"{len(keys)} {what}: {few(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise Unusable(f"it does not fit {model}: " + "; ".join(problems))
    packed = [key for key, entry in entries.items() if entry.dtype is None or not entry.dtype.is_floating_point]
    if packed:
        raise Unusable(f"it holds non-float (packed or quantized) weights, not supported: {few(packed)}", float_hint)


def _scale_name(weight_key: str) -> str:
    return weight_key.removesuffix(".weight") + ".scale_weight"


def few(keys: Sequence[str], n: int = 5) -> str:
    """The first ``n`` keys and how many more there are, for error messages."""
    shown = ", ".join(list(keys)[:n])
    rest = len(keys) - n
    return shown + (f" (and {rest} more)" if rest > 0 else "")
