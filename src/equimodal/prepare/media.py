"""Decoding raw audio and video for the preparers: soundfile, soxr and PyAV (whose wheels carry FFmpeg).

Every function raises :class:`~equimodal.prepare.base.PrepareError` naming the file when it is missing,
empty, truncated or undecodable, so a preparer reports the clip and goes on. The libraries are imported
lazily; a missing one raises ``ImportError`` with the install command.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from .base import PrepareError

AUDIO_INSTALL = "pip install 'equimodal[audio]'"
VIDEO_INSTALL = "pip install 'equimodal[video]'"


def _require(module: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Preparing this dataset needs {module!r} ({err}); install it with: {install}"
        ) from err


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise PrepareError(f"{what} {str(path)!r} is missing")
    if path.stat().st_size == 0:
        raise PrepareError(f"{what} {str(path)!r} is empty (0 bytes)")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A wav/flac file as mono float32 in [-1, 1] and its sample rate (channels averaged)."""
    _check_file(path, "audio file")
    soundfile = _require("soundfile", AUDIO_INSTALL)
    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError on bad files
        raise PrepareError(f"audio file {str(path)!r} cannot be decoded ({err})") from err
    if wave.shape[0] == 0:
        raise PrepareError(f"audio file {str(path)!r} holds no samples")
    return wave.mean(axis=1), int(rate)


def read_audio_track(path: Path) -> tuple[np.ndarray, int]:
    """The audio track of a video file as mono float32 and its sample rate (PyAV, downmixed by FFmpeg)."""
    _check_file(path, "video file")
    av = _require("av", VIDEO_INSTALL)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise PrepareError(f"video file {str(path)!r} has no audio track")
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate)
            mono = av.AudioResampler(format="fltp", layout="mono", rate=rate)
            parts = [
                out.to_ndarray()[0] for frame in container.decode(stream) for out in mono.resample(frame)
            ]
            parts += [out.to_ndarray()[0] for out in mono.resample(None)]
    except PrepareError:
        raise
    except Exception as err:  # av.error.* on truncated or corrupt containers
        raise PrepareError(
            f"video file {str(path)!r} cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    if not parts or not sum(len(p) for p in parts):
        raise PrepareError(f"video file {str(path)!r} has an empty audio track")
    return np.concatenate(parts).astype(np.float32), rate


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` at ``rate`` Hz resampled to ``target`` Hz (soxr, high quality); unchanged when equal."""
    if rate == target:
        return wave
    soxr = _require("soxr", AUDIO_INSTALL)
    return soxr.resample(wave, rate, target).astype(np.float32)


def official_spectrogram(
    wave: np.ndarray, rate: int, *, seconds: float = 3.0, n_fft: int = 512, hop_length: int = 353
) -> np.ndarray:
    """The AMSS/OGM-GE audio input: the waveform tiled to ``seconds``, clipped to [-1, 1], then
    ``log(|STFT| + 1e-7)`` with a Hann window (centred frames), as ``(n_fft // 2 + 1, frames)`` float32.

    At 22 050 Hz, 3 s, n_fft 512 and hop 353 (CREMA-D's recipe) this is 257 x 188.
    """
    length = int(round(seconds * rate))
    reps = -(-length // max(len(wave), 1))
    tiled = np.clip(np.tile(wave, reps)[:length], -1.0, 1.0)
    spec = torch.stft(
        torch.from_numpy(tiled), n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft),
        center=True, return_complex=True,
    )  # fmt: skip
    return torch.log(spec.abs() + 1e-7).numpy().astype(np.float32)


def video_frames(path: Path, *, fps: float | None = None, count: int | None = None) -> list[np.ndarray]:
    """Frames of a video as ``(H, W, 3)`` uint8 RGB arrays (PyAV).

    Args:
        fps: take the frame nearest to every ``1 / fps`` seconds (1.0: one frame per second, as the
            official CREMA-D / Kinetics-Sounds frame folders).
        count: instead, take ``count`` evenly spaced frames over the clip.
        (neither: every frame.)
    """
    _check_file(path, "video file")
    av = _require("av", VIDEO_INSTALL)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise PrepareError(f"video file {str(path)!r} has no video track")
            stream = container.streams.video[0]
            decoded = [(float(f.time or 0.0), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    except PrepareError:
        raise
    except Exception as err:  # av.error.* on truncated or corrupt containers
        raise PrepareError(
            f"video file {str(path)!r} cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    if not decoded:
        raise PrepareError(f"video file {str(path)!r} holds no decodable frame")
    if count is not None:
        picks = np.linspace(0, len(decoded) - 1, count).round().astype(int)
        return [decoded[i][1] for i in picks]
    if fps is None:
        return [img for _, img in decoded]
    times = np.array([t for t, _ in decoded])
    targets = np.arange(0.0, times[-1] + 1e-9, 1.0 / fps) + 0.5 / fps  # the middle of each interval
    picks = sorted({int(np.abs(times - t).argmin()) for t in targets})
    return [decoded[i][1] for i in picks]


def resize_frame(image: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 frame so its shorter side is ``short_side`` (bilinear); ``None``: as is."""
    if short_side is None:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
