"""Streaming video files: frames go to ffmpeg chunk by chunk, so a minutes-long video is written at constant memory.

Runs the ffmpeg binary shipped with ``imageio-ffmpeg`` as a child process fed raw RGB frames. Containers:
``.mp4`` (H.264, yuv420p, ``crf`` 0-51, default 19) and ``.webm`` (VP9, yuv420p, ``crf`` 0-63, default 31).

The file appears under its name only when ffmpeg finished successfully (exit status 0): frames are written to a
hidden temporary file in the same folder, which is renamed over the target at the end, and deleted if ffmpeg fails
(a full disk, say: :class:`VideoWriteError` with ffmpeg's own message), if the ``with`` block raises (including
KeyboardInterrupt) or if :meth:`VideoWriter.abort` is called.
"""

from __future__ import annotations

import logging
import numbers
import os
import secrets
import shutil
import subprocess
import tempfile
from contextlib import contextmanager, suppress
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

WAN_FPS = 16.0  # Wan2.1's native frame rate
FPS_RANGE = (1.0, 240.0)

# container suffix -> (ffmpeg codec, default crf, max crf, extra ffmpeg output options)
_CONTAINERS: dict[str, tuple[str, int, int, tuple[str, ...]]] = {
    ".mp4": ("libx264", 19, 51, ()),
    ".webm": ("libvpx-vp9", 31, 63, ("-b:v", "0", "-row-mt", "1")),  # -b:v 0: constant quality mode for VP9
}

FrameArray = torch.Tensor | np.ndarray


class VideoWriteError(OSError):
    """ffmpeg could not write the video (full disk, no permission, ...); nothing was saved under the name."""


def check_video_path(path: str | os.PathLike[str], fps: float = WAN_FPS, crf: int | None = None, *,
                     folder_may_be_missing: bool = False) -> Path:
    """Check where and how a video will be written, before any work is spent on it; returns the path.

    The folder must exist and take a file (tried with a temporary one), or with ``folder_may_be_missing`` its
    nearest existing ancestor must (see :func:`made_folders`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"the output must be a file path (str or Path), got {path!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # a name longer than the file system allows
        raise ValueError(f"cannot use {path} as a file name ({exc.strerror}): shorten it") from None
    if is_dir:
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / ('video' + (suffix or '.mp4'))}")
    if path.name.lower() in _CONTAINERS:  # '.mp4' alone is a hidden name without a suffix, not a suffix
        raise ValueError(f"{path} has no file name; give one such as {path.with_name('video' + path.name)}")
    if suffix not in _CONTAINERS:
        raise ValueError(f"unknown container {suffix or '(no suffix)'!r} for {path}; "
                         f"use one of {sorted(_CONTAINERS)} (.mp4: H.264, .webm: VP9)")
    check_fps(fps)
    check_crf(crf, suffix)
    existing = next(folder for folder in (path.parent, *path.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, so it cannot hold {path}; choose another place")
    if existing != path.parent and not folder_may_be_missing:
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it before writing {path.name}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot write in the folder {existing} ({exc.strerror}); choose another place for "
                              f"{path.name}") from None
    ffmpeg_exe()  # a missing ffmpeg is found now, not after the video is made
    return path


def check_fps(fps: float) -> None:
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ValueError(f"fps must be between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g} (Wan's is {WAN_FPS:g}), "
                         f"got {fps!r}")


def check_crf(crf: int | None, suffix: str = ".mp4") -> None:
    """None takes the container's default."""
    max_crf = _CONTAINERS[suffix][2]
    if crf is not None and (isinstance(crf, bool) or not isinstance(crf, numbers.Integral) or not 0 <= crf <= max_crf):
        raise ValueError(f"crf for {suffix} must be a whole number in [0, {max_crf}] (lower is better quality), got "
                         f"{crf!r}")


@contextmanager
def made_folders(folder: Path, made: Sequence[Path] = ()) -> Iterator[None]:
    """Make ``folder`` and its missing parents for the block; if the block fails they go again (those still empty).

    ``made``: folders another helper has just made for the same file (innermost first; ComfyUI's path helper
    makes the output subfolders it names), removed with them."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot make the folder {folder}: {exc.strerror}") from None
    try:
        yield
    except BaseException:
        remove_empty_folders([*missing, *made])
        raise


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (innermost first) until one is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written there after all
            break


def frame_rate(fps: float) -> Fraction:
    """The exact rate to write: the NTSC rates typed as 23.976, 29.97 or 59.94 are n * 1000/1001 (24000/1001 for
    23.976, as players expect); other rates as the nearest fraction with a denominator up to 1001."""
    for ntsc in (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001)):
        if abs(fps - ntsc) < 0.005:
            return ntsc
    return Fraction(fps).limit_denominator(1001)


def ffmpeg_exe() -> str:
    """The ffmpeg that writes the videos (imageio-ffmpeg's, or IMAGEIO_FFMPEG_EXE's), checked to be runnable."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ImportError("writing mp4/webm needs the imageio-ffmpeg package (it ships ffmpeg): "
                          "pip install imageio-ffmpeg") from None
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    if shutil.which(exe) is None:
        where = " (set by IMAGEIO_FFMPEG_EXE)" if os.environ.get("IMAGEIO_FFMPEG_EXE") else ""
        raise FileNotFoundError(f"cannot run ffmpeg at {exe}{where}: unset IMAGEIO_FFMPEG_EXE or point it at an "
                                "ffmpeg executable, or reinstall imageio-ffmpeg")
    return exe


def uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """VAE output [1, 3, T, H, W] in [-1, 1] or frames [T, H, W, 3] (float 0..1 or uint8) -> uint8 [T, H, W, 3],
    computed on the tensor's own device (on a GPU this quarters what crosses to the CPU)."""
    if frames.ndim == 5:
        if frames.shape[0] != 1 or frames.shape[1] != 3:
            raise ValueError(f"VAE frames must be [1, 3, T, H, W] (one video per writer), got {tuple(frames.shape)}")
        frames = (frames[0].permute(1, 2, 3, 0).float() + 1.0) / 2.0  # [-1, 1] -> [0, 1], [T, H, W, 3]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (uint8 or float 0..1) or [1, 3, T, H, W] (float -1..1), "
                         f"got shape {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or floating point, got {frames.dtype}")
    return (frames.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def to_uint8_frames(frames: FrameArray) -> np.ndarray:
    """Convert frames to what the writer sends ffmpeg: a C-contiguous uint8 array [T, H, W, 3].

    Accepts ``[T, H, W, 3]`` uint8 (0..255) or float (0..1, e.g. ComfyUI IMAGE), torch or numpy, and VAE output
    ``[1, 3, T, H, W]`` float in [-1, 1] (torch or numpy; one video per writer, so the batch must be 1).
    Floats are clamped and rounded.
    """
    tensor = frames.detach() if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    return np.ascontiguousarray(uint8_frames(tensor).cpu().numpy())


class VideoWriter:
    """Write a video chunk by chunk; use as a context manager.

    >>> with VideoWriter("out.mp4", fps=16) as writer:   # doctest: +SKIP
    ...     for chunk in chunks:
    ...         writer.write(chunk)

    Width and height must be even (yuv420p stores colour at half resolution); odd sizes raise a ValueError
    rather than being padded or scaled silently. All chunks must have the same size.
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = WAN_FPS, crf: int | None = None) -> None:
        self.path = check_video_path(path, fps, crf)
        suffix = self.path.suffix.lower()
        codec, default_crf, _, extra = _CONTAINERS[suffix]
        self.fps = float(fps)
        self.crf = default_crf if crf is None else crf
        self._codec = codec
        self._extra = extra
        self._tmp = self.path.with_name(f".{self.path.stem}.{secrets.token_hex(4)}.partial{suffix}")
        self._ffmpeg: subprocess.Popen | None = None  # started on the first write
        self._messages: Any = None  # ffmpeg's stderr, a temporary file (a pipe could fill up and stall it)
        self._size: tuple[int, int] | None = None  # (width, height)
        self._done = False
        self.frames_written = 0

    def write(self, frames: FrameArray) -> None:
        """Append frames (see :func:`to_uint8_frames` for the accepted layouts)."""
        if self._done:
            raise RuntimeError(f"writer for {self.path} is already closed")
        array = to_uint8_frames(frames)
        height, width = array.shape[1:3]
        if self._size is None:
            if width % 2 or height % 2:
                raise ValueError(f"frame size {width}x{height} has an odd side, which yuv420p cannot store; "
                                 "crop or pad the frames to even sizes (Wan sizes are multiples of 16)")
            self._start(width, height)
        elif (width, height) != self._size:
            raise ValueError(f"frame size {width}x{height} differs from the video's {self._size[0]}x{self._size[1]}")
        try:
            self._ffmpeg.stdin.write(memoryview(array).cast("B"))
        except BrokenPipeError:  # ffmpeg quit early: its message says why
            self._ffmpeg.wait()
            raise self._failure() from None
        self.frames_written += len(array)

    def _start(self, width: int, height: int) -> None:
        self._size = (width, height)
        fps = frame_rate(self.fps)
        command = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                   "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-c:v", self._codec,
                   "-pix_fmt", "yuv420p", "-crf", str(self.crf), *self._extra, str(self._tmp)]
        self._messages = tempfile.TemporaryFile()
        self._ffmpeg = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self._messages)

    def _failure(self) -> VideoWriteError:
        self._messages.seek(0)
        said = self._messages.read().decode(errors="replace").strip().splitlines()[-5:]
        return VideoWriteError(f"ffmpeg could not write {self.path} (exit status {self._ffmpeg.returncode}): "
                               f"{' / '.join(said) or 'no message'}; nothing was saved")

    def close(self) -> Path:
        """Finish the file and move it to its name; returns the path. Raises if no frame was written."""
        if self._done:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; nothing was saved")
        try:
            try:
                self._ffmpeg.stdin.close()  # ffmpeg flushes the encoder and writes the trailer
            except BrokenPipeError:
                pass  # it has already quit; its exit status says how
            if self._ffmpeg.wait() != 0 or not self._tmp.is_file() or self._tmp.stat().st_size == 0:
                raise self._failure()
            try:
                os.replace(self._tmp, self.path)
            except OSError as exc:
                raise VideoWriteError(f"cannot put the finished video at {self.path} ({exc.strerror}); nothing was "
                                      "saved: choose another name or folder") from None
        except BaseException:
            self._discard()
            raise
        self._done = True
        self._messages.close()
        log.info("wrote %s: %d frames, %dx%d, %.3g fps", self.path, self.frames_written, *self._size, self.fps)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial file; the target name is left untouched."""
        if self._done:
            return
        self._discard()

    def _discard(self) -> None:
        self._done = True
        try:
            if self._ffmpeg is not None:
                if self._ffmpeg.poll() is None:
                    self._ffmpeg.kill()
                    self._ffmpeg.wait()
                with suppress(OSError):  # a dead ffmpeg's pipe may refuse the flush
                    self._ffmpeg.stdin.close()
        finally:
            self._tmp.unlink(missing_ok=True)
            if self._messages is not None:
                self._messages.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike[str], frames: FrameArray, fps: float = WAN_FPS, crf: int | None = None) -> Path:
    """Write all ``frames`` at once (any layout :func:`to_uint8_frames` accepts); returns the path."""
    with VideoWriter(path, fps=fps, crf=crf) as writer:
        writer.write(frames)
    return writer.path


__all__ = ["VideoWriter", "VideoWriteError", "check_video_path", "frame_rate", "made_folders", "remove_empty_folders",
           "write_video", "to_uint8_frames", "WAN_FPS"]
