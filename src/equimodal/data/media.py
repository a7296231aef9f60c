"""Readers for media files on disk: each turns one file (or frame folder) into one tensor.

Every reader is a small function of a path and its settings. Readers with a random part take a
``generator``: ``None`` means evaluation (a deterministic transform), a ``torch.Generator`` means
training, and then every random draw comes from that generator only (never from a global RNG), so a
run is reproduced exactly whatever the number of ``DataLoader`` workers.

File types (by extension; a folder is a folder of frames):

- ``.npy``: the array as float32 (:func:`read_npy`).
- ``.wav`` / ``.flac``: mono audio at a fixed rate and length, as a waveform ``(1, T)`` or a
  log-magnitude spectrogram ``(1, F, T)`` (:func:`read_audio`; needs soundfile and soxr).
- ``.png`` / ``.jpg`` / ``.jpeg``: an image ``(C, H, W)`` in [0, 1] (:func:`read_image`; needs Pillow).
- a folder of images: ``frames`` of them ``(frames, C, H, W)`` (:func:`read_frames`; needs Pillow).
- ``.txt``: UTF-8 text as ``max_tokens`` token ids (:func:`read_text`; needs tokenizers).

A file that is missing, empty or cannot be decoded raises :class:`MediaError`, whose message says what
was wrong with the file (the caller adds where the file is listed). Media libraries are imported
lazily; a missing one raises ``ImportError`` with the install command.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor

from .transforms import maybe_hflip, random_resized_crop

log = logging.getLogger(__name__)

MediaKind = Literal["npy", "audio", "image", "frames", "text"]
AUDIO_INSTALL = "pip install 'equimodal[audio]'"
VISION_INSTALL = "pip install 'equimodal[vision]'"
TEXT_INSTALL = "pip install 'equimodal[text]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
KIND_BY_SUFFIX: dict[str, MediaKind] = {
    ".npy": "npy",
    ".wav": "audio",
    ".flac": "audio",
    **{s: "image" for s in IMAGE_SUFFIXES},
    ".txt": "text",
}
PAD_ID = 0
T = TypeVar("T")


class MediaError(ValueError):
    """A media file that is missing, empty or cannot be decoded; the message completes "file 'x' ..."."""


def require(module: str, install: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` naming what needs it and the install command.

    ``package`` is the distribution's name when it differs from the module's (``Pillow`` for ``PIL``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Reading {purpose} needs the {package or module!r} package (import {module!r} failed: {err}). "
            f"Install it with: {install}"
        ) from err


def decoded(what: str, read: Callable[[], T]) -> T:
    """Run ``read()``; any decoding failure becomes a :class:`MediaError` saying the file is not ``what``.

    ``ImportError`` (a missing library) and :class:`MediaError` pass through unchanged.
    """
    try:
        return read()
    except (ImportError, MediaError):
        raise
    except Exception as err:  # corrupt files raise all sorts of errors from the decoding libraries
        raise MediaError(f"cannot be read as {what} ({type(err).__name__}: {err})") from err


def media_kind(path: Path) -> MediaKind | None:
    """The media kind of ``path`` by its extension (a folder, or no extension, is ``"frames"``).

    Returns ``None`` for an extension no reader handles.
    """
    if path.is_dir() or not (path.suffix or path.is_file()):
        return "frames"
    return KIND_BY_SUFFIX.get(path.suffix.lower())


# ------------------------------------------------------------------------------------------- checks
def check_exists(path: Path, kind: MediaKind) -> None:
    """Raise :class:`MediaError` unless ``path`` exists and is non-empty (a folder: holds an image)."""
    if kind == "frames":
        if not path.is_dir():
            raise MediaError("does not exist or is not a folder" + _looked(path))
        if not list_frames(path):
            raise MediaError(f"is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
        return
    if not path.exists():
        raise MediaError("does not exist" + _looked(path))
    if not path.is_file():
        raise MediaError("is not a file")
    if path.stat().st_size == 0:
        raise MediaError("is empty (0 bytes)")


def _looked(path: Path) -> str:
    return f" (looked for {str(path)!r})"


def check_header(path: Path, kind: MediaKind) -> tuple[int, ...] | None:
    """Existence checks plus a cheap parse of the header; returns the array shape for ``.npy`` files.

    Audio: ``soundfile.info`` and at least one sample; images: Pillow's ``verify``; frame folders: their
    first image verified; text: decodes as UTF-8; ``.npy``: the header (shape and numeric dtype), read
    without loading the data.
    """
    check_exists(path, kind)
    if kind == "npy":
        return npy_shape(path)
    if kind == "audio":
        sf = require("soundfile", AUDIO_INSTALL, "audio files")
        info = decoded("audio", lambda: sf.info(str(path)))
        if info.frames <= 0:
            raise MediaError("holds no audio samples (0 frames)")
    elif kind in ("image", "frames"):
        image = list_frames(path)[0] if kind == "frames" else path
        pil = require("PIL.Image", VISION_INSTALL, "images", "Pillow")

        def verify() -> None:
            with pil.open(image) as im:
                im.verify()

        where = f"an image (frame {image.name!r})" if kind == "frames" else "an image"
        decoded(where, verify)
    elif kind == "text":
        decoded("UTF-8 text", lambda: path.read_bytes().decode("utf-8"))
    return None


# --------------------------------------------------------------------------------------------- npy
def npy_shape(path: Path) -> tuple[int, ...]:
    """The shape of a ``.npy`` array from its header (the data is memory-mapped, not read)."""

    def header() -> tuple[tuple[int, ...], np.dtype]:
        arr = _one_array(np.load(path, mmap_mode="r", allow_pickle=False))
        shape, dtype = tuple(int(s) for s in arr.shape), arr.dtype
        del arr
        return shape, dtype

    shape, dtype = decoded("a .npy array", header)
    _check_numeric(dtype)
    return shape


def _one_array(loaded: object) -> np.ndarray:
    if not isinstance(loaded, np.ndarray):
        if isinstance(loaded, np.lib.npyio.NpzFile):
            loaded.close()
        raise MediaError(
            f"holds {type(loaded).__name__} (an .npz archive?), expected one array saved by np.save"
        )
    return loaded


def _check_numeric(dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise MediaError(f"holds an array of dtype {dtype}, expected numbers (bool, int or float)")


def read_npy(path: Path) -> Tensor:
    """A ``.npy`` file's array as a float32 tensor of the array's shape."""
    arr = decoded("a .npy array", lambda: _one_array(np.load(path, allow_pickle=False)))
    _check_numeric(arr.dtype)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


# ------------------------------------------------------------------------------------------- audio
def load_audio(path: Path, sample_rate: int) -> np.ndarray:
    """A ``.wav``/``.flac`` file as mono float32 ``(samples,)`` at ``sample_rate`` (channels averaged).

    Files at another rate are resampled with soxr.
    """
    sf = require("soundfile", AUDIO_INSTALL, "audio files")
    data, rate = decoded("audio", lambda: sf.read(str(path), dtype="float32", always_2d=True))
    wave = data.mean(axis=1, dtype=np.float32)
    if wave.size == 0:
        raise MediaError("holds no audio samples (0 frames)")
    if rate != sample_rate:
        log.debug("resampling %s from %d Hz to %d Hz", path, rate, sample_rate)
        soxr = require("soxr", AUDIO_INSTALL, "audio at another sample rate")
        wave = soxr.resample(wave, rate, sample_rate).astype(np.float32, copy=False)
    return wave


def fit_length(wave: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """Cut ``wave`` (samples,) to ``length`` or zero-pad it at the end.

    A longer wave is cropped at a random offset drawn from ``generator`` (training) or centred
    (``generator=None``, evaluation).
    """
    n = int(wave.shape[0])
    if n < length:
        return torch.nn.functional.pad(wave, (0, length - n))
    extra = n - length
    random = generator is not None
    start = int(torch.randint(0, extra + 1, (1,), generator=generator)) if random else extra // 2
    return wave[start : start + length]


def log_spectrogram(wave: Tensor, n_fft: int, hop_length: int) -> Tensor:
    """``log(1 + |STFT|)`` of ``wave`` (samples,) with a Hann window: ``(1, n_fft // 2 + 1, frames)``."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave, n_fft, hop_length=hop_length, window=window, center=True, return_complex=True)
    return torch.log1p(spec.abs()).unsqueeze(0)


def read_audio(
    path: Path,
    generator: torch.Generator | None = None,
    *,
    sample_rate: int = 16000,
    seconds: float = 3.0,
    mode: Literal["waveform", "spectrogram"] = "spectrogram",
    n_fft: int = 512,
    hop_length: int = 160,
) -> Tensor:
    """An audio file as a fixed-length waveform ``(1, T)`` or log-magnitude spectrogram ``(1, F, T)``.

    Mono at ``sample_rate`` (see :func:`load_audio`), cut or zero-padded to ``round(seconds *
    sample_rate)`` samples (see :func:`fit_length`: random crop with a ``generator``, centre crop
    without).
    """
    wave = torch.from_numpy(load_audio(path, sample_rate))
    wave = fit_length(wave, audio_length(seconds, sample_rate), generator)
    if mode == "waveform":
        return wave.unsqueeze(0)
    return log_spectrogram(wave, n_fft, hop_length)


def audio_length(seconds: float, sample_rate: int) -> int:
    """Number of samples of a clip of ``seconds`` at ``sample_rate``."""
    return int(round(seconds * sample_rate))


# ------------------------------------------------------------------------------------------ images
def read_rgb(path: Path) -> Tensor:
    """A JPEG/PNG image as float32 ``(3, H, W)`` in [0, 1] at its own size (needs Pillow)."""
    pil = require("PIL.Image", VISION_INSTALL, "images", "Pillow")

    def load() -> np.ndarray:
        with pil.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0

    return torch.from_numpy(np.ascontiguousarray(decoded("an image", load).transpose(2, 0, 1)))


def read_image(path: Path, *, size: int = 64, mode: Literal["RGB", "L"] = "RGB") -> Tensor:
    """An image as float32 ``(C, size, size)`` in [0, 1]: RGB (C = 3) or grayscale ``"L"`` (C = 1).

    Resized (bilinear) to a square; no random transform.
    """
    pil = require("PIL.Image", VISION_INSTALL, "images", "Pillow")

    def load() -> np.ndarray:
        with pil.open(path) as im:
            im = im.convert(mode).resize((size, size), pil.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0

    arr = decoded("an image", load)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def list_frames(folder: Path) -> list[Path]:
    """The image files (``.png``, ``.jpg``, ``.jpeg``) directly inside ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def frame_positions(available: int, frames: int, generator: torch.Generator | None = None) -> list[int]:
    """Which of ``available`` frames to take: ``frames`` sorted positions.

    Training (a ``generator``): distinct positions drawn at random, sorted. Evaluation (``None``):
    evenly spaced, ``round(linspace(0, available - 1, frames))``. With fewer frames available than
    asked, all of them are taken and the last one is repeated.
    """
    if available < frames:
        return list(range(available)) + [available - 1] * (frames - available)
    if generator is None:
        return [int(i) for i in np.round(np.linspace(0, available - 1, frames))]
    return sorted(int(i) for i in torch.randperm(available, generator=generator)[:frames])


def read_frames(
    folder: Path,
    generator: torch.Generator | None = None,
    *,
    frames: int = 4,
    size: int = 64,
    mode: Literal["RGB", "L"] = "RGB",
) -> Tensor:
    """A folder of frames (image files, sorted by name) as ``(frames, C, size, size)``.

    The frames are chosen by :func:`frame_positions` (random in training, evenly spaced in evaluation;
    a folder with fewer images than ``frames`` repeats its last image) and each is read as
    :func:`read_image` does.
    """
    chosen = choose_frames(folder, frames, generator)
    return torch.stack([read_image(path, size=size, mode=mode) for path in chosen])


def choose_frames(folder: Path, frames: int, generator: torch.Generator | None = None) -> list[Path]:
    """The ``frames`` image files of ``folder`` that :func:`frame_positions` picks (sorted by name).

    Raises:
        MediaError: ``folder`` is not a folder holding image files.
    """
    files = list_frames(folder) if folder.is_dir() else []
    if not files:
        raise MediaError(f"is not a folder holding image files ({', '.join(IMAGE_SUFFIXES)})")
    return [files[i] for i in frame_positions(len(files), frames, generator)]


# -------------------------------------------------------------------------------------------- text
class LocalTokenizer:
    """A tokenizer read from a local path, loaded lazily (it pickles as its path into workers).

    Args:
        path: a ``tokenizer.json`` file (read with ``tokenizers.Tokenizer.from_file``) or a folder saved by
            transformers (``AutoTokenizer.from_pretrained(path, local_files_only=True)``). Nothing is
            downloaded.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_tok": None}

    def _load(self) -> Any:
        if self._tok is None:
            self._tok = self._load_folder() if self.path.is_dir() else self._load_file()
        return self._tok

    def _load_file(self) -> Any:
        tokenizers = require("tokenizers", TEXT_INSTALL, "text files")
        return tokenizers.Tokenizer.from_file(str(self.path))

    def _load_folder(self) -> Any:
        transformers = require(
            "transformers", TEXT_INSTALL + " (or pass a tokenizer.json file)", "a tokenizer folder"
        )
        return transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)

    @property
    def vocab_size(self) -> int:
        """The number of token ids (every id is below it)."""
        tok = self._load()
        return int(tok.get_vocab_size()) if hasattr(tok, "get_vocab_size") else len(tok)

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        tok = self._load()
        out = tok.encode(text)
        return list(out.ids) if hasattr(out, "ids") else list(out)


def token_ids(ids: list[int], max_tokens: int) -> Tensor:
    """``ids`` truncated or padded with :data:`PAD_ID` (0) to ``(max_tokens,)`` long."""
    out = torch.full((max_tokens,), PAD_ID, dtype=torch.long)
    kept = ids[:max_tokens]
    if kept:
        out[: len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out


def read_text(path: Path, tokenizer: LocalTokenizer, *, max_tokens: int = 64) -> Tensor:
    """A UTF-8 text file as token ids ``(max_tokens,)`` long, padded with id 0 (see :func:`token_ids`)."""
    text = decoded("UTF-8 text", lambda: path.read_bytes().decode("utf-8"))
    return token_ids(tokenizer.encode(text.strip()), max_tokens)


def augment_image(
    image: Tensor, augment: Literal["none", "flip", "crop_flip"], generator: torch.Generator | None
) -> Tensor:
    """The training augmentation of an image ``(C, H, W)`` or a clip ``(T, C, H, W)`` (one draw per clip).

    ``"flip"``: a left-right flip with probability 1/2; ``"crop_flip"``: torchvision's
    ``RandomResizedCrop`` (area 8-100 %, aspect 3/4-4/3, resized back to the same size) then the flip,
    the official CREMA-D and Kinetics-Sounds image transform. Evaluation (``generator=None``) and
    ``"none"`` leave the image as it is.
    """
    if generator is None or augment == "none":
        return image
    if augment == "crop_flip":
        image = random_resized_crop(image, image.shape[-1], generator)
    return maybe_hflip(image, generator)


# ---------------------------------------------------------------------------------------- dispatch
@dataclass(frozen=True)
class MediaSettings:
    """How every kind of file is read (the ``manifest`` dataset's options)."""

    sample_rate: int = 16000
    audio_seconds: float = 3.0
    audio: Literal["waveform", "spectrogram"] = "spectrogram"
    n_fft: int = 512
    hop_length: int = 160
    image_size: int = 64
    image_mode: Literal["RGB", "L"] = "RGB"
    frames: int = 4
    max_tokens: int = 64
    tokenizer: LocalTokenizer | None = None
    image_augment: Literal["none", "flip", "crop_flip"] = "none"


def read_media(
    kind: MediaKind, path: Path, settings: MediaSettings, generator: torch.Generator | None = None
) -> Tensor:
    """Read one file (or frame folder) of ``kind`` with ``settings``; ``generator`` as in the readers."""
    s = settings
    if kind == "npy":
        return read_npy(path)
    if kind == "audio":
        return read_audio(
            path, generator, sample_rate=s.sample_rate, seconds=s.audio_seconds, mode=s.audio,
            n_fft=s.n_fft, hop_length=s.hop_length,
        )  # fmt: skip
    if kind == "image":
        return augment_image(
            read_image(path, size=s.image_size, mode=s.image_mode), s.image_augment, generator
        )
    if kind == "frames":
        clip = read_frames(path, generator, frames=s.frames, size=s.image_size, mode=s.image_mode)
        return augment_image(clip, s.image_augment, generator)
    if kind == "text":
        if s.tokenizer is None:
            raise ValueError("Reading text files needs a tokenizer: pass the option `tokenizer`.")
        return read_text(path, s.tokenizer, max_tokens=s.max_tokens)
    raise ValueError(f"Unknown media kind {kind!r}; expected one of npy, audio, image, frames, text.")
