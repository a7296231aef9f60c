"""Decoding raw audio and video for the preparers: soundfile, soxr and PyAV (whose wheels carry FFmpeg).

Every function raises :class:`~equimodal.prepare.base.PrepareError` naming the file when it is missing,
empty, truncated or undecodable, so a preparer reports the clip and goes on. The libraries are imported
lazily; a missing one raises ``ImportError`` with the install command.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .base import PrepareError

AUDIO_INSTALL = "pip install 'equimodal[audio]'"
VIDEO_INSTALL = "pip install 'equimodal[video]'"


def require(module: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Preparing this dataset needs {module!r} ({err}); install it with: {install}"
        ) from err


def check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise PrepareError(f"{what} {str(path)!r} is missing")
    if path.stat().st_size == 0:
        raise PrepareError(f"{what} {str(path)!r} is empty (0 bytes)")


@contextmanager
def open_video(path: Path) -> Iterator[tuple[ModuleType, Any]]:
    """``(av, container)`` for a video file, closed on exit; an error while it is open (PyAV raises
    ``av.error.*`` on truncated or corrupt containers) becomes a :class:`PrepareError` naming the file.

    Raises:
        PrepareError: the file is missing, empty or cannot be decoded.
    """
    check_file(path, "video file")
    av = require("av", VIDEO_INSTALL)
    try:
        with av.open(str(path)) as container:
            yield av, container
    except PrepareError:
        raise
    except Exception as err:
        raise PrepareError(
            f"video file {str(path)!r} cannot be decoded ({type(err).__name__}: {err})"
        ) from err


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A wav/flac file as mono float32 in [-1, 1] and its sample rate (channels averaged)."""
    check_file(path, "audio file")
    soundfile = require("soundfile", AUDIO_INSTALL)
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise PrepareError(f"audio file {str(path)!r} cannot be decoded ({err})") from err
    if wave.shape[0] == 0:
        raise PrepareError(f"audio file {str(path)!r} holds no samples")
    return wave.mean(axis=1), int(rate)


def read_audio_track(path: Path) -> tuple[np.ndarray, int]:
    """The audio track of a video file as mono float32 and its sample rate (PyAV, downmixed by FFmpeg)."""
    with open_video(path) as (av, container):
        if not container.streams.audio:
            raise PrepareError(f"video file {str(path)!r} has no audio track")
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate)
        mono = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        parts = [out.to_ndarray()[0] for frame in container.decode(stream) for out in mono.resample(frame)]
        parts += [out.to_ndarray()[0] for out in mono.resample(None)]
    if not parts or not sum(len(p) for p in parts):
        raise PrepareError(f"video file {str(path)!r} has an empty audio track")
    return np.concatenate(parts).astype(np.float32), rate


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` at ``rate`` Hz resampled to ``target`` Hz (soxr, high quality); unchanged when equal."""
    if rate == target:
        return wave
    soxr = require("soxr", AUDIO_INSTALL)
    return soxr.resample(wave, rate, target).astype(np.float32)


def official_spectrogram(
    wave: np.ndarray, rate: int, *, seconds: float = 3.0, n_fft: int = 512, hop_length: int = 353
) -> np.ndarray:
    """The AMSS/OGM-GE audio input: the waveform tiled to ``seconds``, clipped to [-1, 1], then
    ``log(|STFT| + 1e-7)`` with a Hann window (centred frames), as ``(n_fft // 2 + 1, frames)`` float32.

    At 22 050 Hz, 3 s, n_fft 512 and hop 353 (CREMA-D's recipe) this is 257 x 188. The centred frames
    are padded by reflection, as ``librosa.stft`` did before librosa 0.10 (the official code's time);
    librosa 0.10 and later pad with zeros, which changes the first and last frame only.
    """
    length = int(round(seconds * rate))
    reps = -(-length // max(len(wave), 1))
    tiled = np.clip(np.tile(wave, reps)[:length], -1.0, 1.0)
    spec = torch.stft(
        torch.from_numpy(tiled), n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft),
        center=True, pad_mode="reflect", return_complex=True,
    )  # fmt: skip
    return torch.log(spec.abs() + 1e-7).numpy().astype(np.float32)


def iter_video_frames(path: Path) -> Iterator[Any]:
    """Decoded ``av.VideoFrame`` objects of a video's first video stream, streamed (PyAV).

    Callers convert only the frames they keep (``frame.to_ndarray(format=...)``); breaking out of the
    loop closes the file.

    Raises:
        PrepareError: the file is missing, empty, has no video track or cannot be decoded.
    """
    with open_video(path) as (_, container):
        if not container.streams.video:
            raise PrepareError(f"video file {str(path)!r} has no video track")
        yield from container.decode(container.streams.video[0])


class NearestPicker:
    """Streams ``(time, frame)`` in time order; keeps the frame nearest each target ``(k + 0.5) * step``
    for every ``k`` with ``k * step`` at most the last frame's time (each frame kept once, converted to
    an ``(H, W, 3)`` uint8 RGB array only when kept)."""

    def __init__(self, step: float) -> None:
        self.step, self.k, self.count = step, 0, 0
        self.prev: tuple[float, Any, int] | None = None
        self.kept: list[np.ndarray] = []
        self.last_index = -1

    def _keep(self, frame: Any, index: int) -> None:
        if index != self.last_index:
            self.kept.append(frame.to_ndarray(format="rgb24"))
            self.last_index = index

    def add(self, time: float, frame: Any) -> None:
        index, self.count = self.count, self.count + 1
        while (target := (self.k + 0.5) * self.step) < time:
            prev = self.prev
            if prev is not None and target - prev[0] <= time - target:
                self._keep(prev[1], prev[2])
            else:
                self._keep(frame, index)
            self.k += 1
        self.prev = (time, frame, index)

    def finish(self) -> list[np.ndarray]:
        if self.prev is not None and self.k * self.step <= self.prev[0] + 1e-9:
            self._keep(self.prev[1], self.prev[2])
        return self.kept


def video_frames(path: Path, *, fps: float | None = None, count: int | None = None) -> list[np.ndarray]:
    """Frames of a video as ``(H, W, 3)`` uint8 RGB arrays (PyAV), converting only the frames kept.

    Args:
        fps: take the frame nearest the middle of every ``1 / fps`` seconds (1.0: one frame per second,
            as the official CREMA-D / Kinetics-Sounds frame folders); streamed, so long videos need little
            memory.
        count: instead, take ``count`` evenly spaced frames over the clip.
        (neither: every frame.)

    Raises:
        PrepareError: the file is missing, empty, has no video track, cannot be decoded or holds no frame.
    """
    if fps is not None and count is None:
        picker = NearestPicker(1.0 / fps)
        for frame in iter_video_frames(path):
            picker.add(float(frame.time or 0.0), frame)
        frames = picker.finish() if picker.count else []
    else:
        decoded = list(iter_video_frames(path))
        picks = range(len(decoded))
        if count is not None and decoded:
            picks = np.linspace(0, len(decoded) - 1, count).round().astype(int).tolist()
        frames = [decoded[i].to_ndarray(format="rgb24") for i in picks]
    if not frames:
        raise PrepareError(f"video file {str(path)!r} holds no decodable frame")
    return frames


def check_flv_complete(path: Path) -> None:
    """Raise :class:`PrepareError` when an flv file is truncated.

    A truncated FLV still decodes (FFmpeg stops at the cut), so the packets are compared with the
    duration its header declares; without a declared duration, the file must end on a complete tag
    (its last four bytes give the size of the tag before them).
    """
    with open_video(path) as (_, container):
        declared = container.duration / 1e6 if container.duration else None
        stream = container.streams.video[0] if container.streams.video else None
        end = 0.0
        for packet in container.demux(stream) if stream is not None else ():
            if packet.pts is not None and packet.time_base is not None:
                end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    if declared is not None:
        if end < declared - max(0.25, 0.1 * declared):
            raise PrepareError(
                f"video file {str(path)!r} is truncated: its packets cover {end:.2f} s of the {declared:.2f} s "
                "its header declares (download it again)"
            )
    elif not _flv_tail_complete(path):
        raise PrepareError(f"video file {str(path)!r} is truncated: it does not end on a complete FLV tag")


def _flv_tail_complete(path: Path) -> bool:
    """Whether the file ends on a whole FLV tag: its last 4 bytes give the size of the tag before them."""
    size = path.stat().st_size
    if size < 13:
        return False
    with path.open("rb") as f:
        f.seek(size - 4)
        tag = int.from_bytes(f.read(4), "big")
        start = size - 4 - tag
        if tag == 0:
            return size == 13  # a header without tags
        if tag < 11 or start < 13:
            return False
        f.seek(start + 1)
        return int.from_bytes(f.read(3), "big") == tag - 11


def resize_frame(image: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 frame so its shorter side is ``short_side`` (bilinear); ``None``: as is."""
    if short_side is None:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
