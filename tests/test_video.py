"""Streaming video writer: round trips through ffmpeg (imageio-ffmpeg's binary), and no half-written files."""

from __future__ import annotations

from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from histream_core import video
from histream_core.video import (VideoWriteError, VideoWriter, check_video_path, frame_rate, made_folders,
                                 to_uint8_frames, write_video)


def gradient_frames(t: int, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving gradients [T, H, W, 3] uint8 (compress well, so pixel values survive the codec)."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + 8 * i) % 256, (y * 6) % 256, np.full_like(x, 40 * i % 256)], axis=-1)
              for i in range(t)]
    return np.asarray(frames, dtype=np.uint8)


def read_back(path) -> tuple[np.ndarray, float]:
    reader = imageio.get_reader(str(path))
    try:
        return np.asarray([frame for frame in reader]), reader.get_meta_data()["fps"]
    finally:
        reader.close()


def test_mp4_round_trip_in_chunks(tmp_path) -> None:
    frames = gradient_frames(12)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps=16, crf=10) as writer:
        writer.write(frames[:5])                                                   # uint8 [T, H, W, 3]
        writer.write(torch.from_numpy(frames[5:9]).float() / 255)                   # ComfyUI IMAGE, 0..1
        writer.write(torch.from_numpy(frames[9:]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)  # VAE [1,3,T,H,W]
    assert writer.frames_written == 12
    back, fps = read_back(path)
    assert back.shape == (12, 32, 48, 3) and fps == 16
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy, but the same pictures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_webm_round_trip(tmp_path) -> None:
    path = write_video(tmp_path / "clip.webm", gradient_frames(5), fps=24)
    back, fps = read_back(path)
    assert back.shape == (5, 32, 48, 3) and fps == 24
    with imageio.get_reader(str(path)) as reader:
        assert reader.get_meta_data()["codec"] == "vp9"


@pytest.mark.parametrize("stop", ["exception", "abort", "interrupt"])
def test_failed_write_leaves_no_file(tmp_path, stop: str) -> None:
    path = tmp_path / "clip.mp4"
    expected = nullcontext() if stop == "abort" else pytest.raises((RuntimeError, KeyboardInterrupt))
    with expected:
        with VideoWriter(path) as writer:
            writer.write(gradient_frames(4))
            if stop == "abort":
                writer.abort()
            else:
                raise RuntimeError("sampler failed") if stop == "exception" else KeyboardInterrupt
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_failed_write_keeps_an_existing_file(tmp_path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous video")
    with pytest.raises(ValueError, match="differs"):
        with VideoWriter(path) as writer:
            writer.write(gradient_frames(2))
            writer.write(gradient_frames(2, h=16))
    assert path.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


FAILING_FFMPEG = """#!/bin/sh
for output; do :; done
cat > /dev/null
printf 'half a video' > "$output"
echo "av_interleaved_write_frame(): No space left on device" >&2
exit 1
"""


def with_fake_ffmpeg(tmp_path, monkeypatch, script: str) -> Path:
    """Make the writer run ``script`` as its ffmpeg; returns an empty folder to write into."""
    fake = tmp_path / "ffmpeg"
    fake.write_text(script)
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_an_ffmpeg_failure_is_an_error_and_saves_nothing(tmp_path, monkeypatch) -> None:
    """ffmpeg that fails at the end (a full disk when it writes the trailer) leaves a non-empty file: its exit status,
    not the file's size, says whether the video is whole."""
    out = with_fake_ffmpeg(tmp_path, monkeypatch, FAILING_FFMPEG)
    (out / "clip.mp4").write_bytes(b"previous video")
    with pytest.raises(VideoWriteError, match="No space left on device.*nothing was saved"):
        write_video(out / "clip.mp4", gradient_frames(3))
    assert [p.name for p in out.iterdir()] == ["clip.mp4"] and (out / "clip.mp4").read_bytes() == b"previous video"


QUITTING_FFMPEG = """#!/bin/sh
echo "Unknown encoder 'libx264'" >&2
exit 1
"""


def test_ffmpeg_quitting_mid_stream_is_an_error_and_saves_nothing(tmp_path, monkeypatch) -> None:
    """ffmpeg that quits before reading (a build without the codec, a crash) breaks the pipe while frames are written:
    the write raises ffmpeg's own message and nothing is left, not even the partial file."""
    out = with_fake_ffmpeg(tmp_path, monkeypatch, QUITTING_FFMPEG)
    with pytest.raises(VideoWriteError, match="Unknown encoder 'libx264'.*nothing was saved"):
        with VideoWriter(out / "clip.mp4") as writer:
            for _ in range(20):  # far more than a pipe buffer holds: a write meets the closed pipe
                writer.write(gradient_frames(8, h=128, w=128))
    assert list(out.iterdir()) == []


def test_a_target_that_became_a_folder_is_an_error_and_the_partial_file_goes(tmp_path) -> None:
    """The final rename can fail (the name taken meanwhile, no permission): an error, and the partial file goes."""
    path = tmp_path / "clip.mp4"
    writer = VideoWriter(path)
    writer.write(gradient_frames(2))
    path.mkdir()  # something took the name while the video was written
    with pytest.raises(VideoWriteError, match="cannot put the finished video at .*clip.mp4.*nothing was saved"):
        writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and path.is_dir()
    with pytest.raises(RuntimeError, match="already closed"):
        writer.write(gradient_frames(1))
    writer.abort()  # a no-op once closed


def test_the_output_path_is_checked_before_any_work(tmp_path) -> None:
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_video_path(tmp_path / "taken.mp4")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is a file, so it cannot hold"):
        check_video_path(tmp_path / "file" / "new" / "clip.mp4", folder_may_be_missing=True)
    for fps in (float("nan"), float("inf"), 0.00001, 1e9, "16"):
        with pytest.raises(ValueError, match="fps must be between"):
            check_video_path(tmp_path / "clip.mp4", fps=fps)
    with pytest.raises(ValueError, match="must be a file path"):
        check_video_path(5)
    if Path("/proc/self").is_dir():  # a folder that takes no files, even for root
        with pytest.raises(PermissionError, match="cannot write in the folder /proc"):
            check_video_path("/proc/clip.mp4")
    with pytest.raises(FileNotFoundError, match="create it before writing"):
        check_video_path(tmp_path / "a" / "clip.mp4")
    assert check_video_path(tmp_path / "a" / "b" / "clip.mp4", folder_may_be_missing=True).name == "clip.mp4"
    assert check_video_path(tmp_path / "clip.webm", fps=23.976) == tmp_path / "clip.webm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken.mp4"]  # the probe file is gone
    with pytest.raises(ValueError, match="has no file name; give one such as .*/video.mp4"):
        check_video_path(tmp_path / ".mp4")  # '.mp4' alone is a name without a suffix
    with pytest.raises(ValueError, match="as a file name \\(File name too long\\): shorten it"):
        check_video_path(tmp_path / ("a" * 300 + ".mp4"))


def test_a_missing_ffmpeg_is_found_before_any_work(tmp_path, monkeypatch) -> None:
    """IMAGEIO_FFMPEG_EXE pointing nowhere used to fail with a bare [Errno 2] after the whole video was made."""
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no" / "ffmpeg"))
    with pytest.raises(FileNotFoundError, match="cannot run ffmpeg at .*/no/ffmpeg \\(set by IMAGEIO_FFMPEG_EXE\\): "
                                                "unset IMAGEIO_FFMPEG_EXE"):
        check_video_path(tmp_path / "clip.mp4")


def test_made_folders_go_again_when_the_run_fails(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with made_folders(tmp_path / "a" / "b"):
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []
    with made_folders(tmp_path / "a" / "b"):
        pass
    assert (tmp_path / "a" / "b").is_dir()


def test_bad_arguments_are_explained(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown container '.avi'"):
        VideoWriter(tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="crf"):
        VideoWriter(tmp_path / "clip.mp4", crf=60)
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "clip.mp4", fps=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "clip.mp4")
    with pytest.raises(ValueError, match="odd side"):
        with VideoWriter(tmp_path / "clip.mp4") as writer:
            writer.write(gradient_frames(2, h=33))
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "clip.webm"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_frame_conversion() -> None:
    images = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 4, 1).expand(1, 1, 4, 3)  # [T, H, W, 3] float
    assert to_uint8_frames(images)[0, 0, :, 0].tolist() == [0, 128, 255, 255]
    vae_frames = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
    assert to_uint8_frames(vae_frames)[:, 0, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="one video per writer"):
        to_uint8_frames(torch.zeros(2, 3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        to_uint8_frames(torch.zeros(4, 3, 8, 8))


def test_integer_frames_other_than_uint8_are_refused() -> None:
    """Integer frames other than uint8 have no known range: read as 0..1 floats they would come out white."""
    with pytest.raises(ValueError, match="frames must be uint8 or floating point, got torch.int64"):
        to_uint8_frames(np.zeros((1, 4, 4, 3), dtype=np.int64))


def test_fractional_fps_and_yuv420p_reach_the_file(tmp_path) -> None:
    """23.976 fps is stored as 24000/1001, not rounded to 24; the H.264 stream is yuv420p, which every player
    decodes (libx264 would pick 4:4:4 for RGB input, which many players and browsers cannot play)."""
    path = write_video(tmp_path / "clip.mp4", gradient_frames(3), fps=23.976)
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert meta["fps"] == pytest.approx(24000 / 1001, abs=0.01)  # ffmpeg reports 23.98
    assert meta["pix_fmt"].startswith("yuv420p")
    assert [frame_rate(fps) for fps in (23.976, 29.97, 59.94, 16.0, 12.5)] == [
        Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001), 16, Fraction(25, 2)]


def test_crf_sets_the_quality(tmp_path) -> None:
    """crf reaches the encoder: crf 0 keeps far more of the picture than crf 51 (measured: mean error 1.8 vs 9.3 on
    these gradients), and on noise, which does not compress, far more bytes (10.7 vs 1.6 kB)."""
    frames = gradient_frames(4)
    best, worst = (write_video(tmp_path / f"crf{crf}.mp4", frames, crf=crf) for crf in (0, 51))
    errors = [np.abs(read_back(path)[0].astype(int) - frames).mean() for path in (best, worst)]
    assert errors[0] < errors[1] / 2
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    sizes = [write_video(tmp_path / f"noise{crf}.mp4", noise, crf=crf).stat().st_size for crf in (0, 51)]
    assert sizes[0] > 4 * sizes[1]


def test_an_ffmpeg_that_cannot_run_is_found_before_any_work(tmp_path, monkeypatch) -> None:
    """IMAGEIO_FFMPEG_EXE naming something that exists but is not a program (a file without the execute bit, a
    folder) fails like a missing one, before the video is made."""
    not_executable = tmp_path / "ffmpeg"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    for exe in (not_executable, tmp_path):
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))
        with pytest.raises(FileNotFoundError, match="cannot run ffmpeg at .* \\(set by IMAGEIO_FFMPEG_EXE\\)"):
            check_video_path(tmp_path / "clip.mp4")


def test_a_container_suffix_alone_in_any_case_is_not_a_file_name(tmp_path) -> None:
    """'.MP4' is a hidden name without a suffix, as '.mp4' is: the message says a file name is missing."""
    for name in (".MP4", ".WebM"):
        with pytest.raises(ValueError, match=f"has no file name; give one such as .*/video\\{name}"):
            check_video_path(tmp_path / name)
