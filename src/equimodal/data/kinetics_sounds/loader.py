"""The ``kinetics_sounds`` dataset: Kinetics-Sounds from a folder written by ``equimodal prepare kinetics_sounds``.

Classes in sorted order of their names (the version, counts and classes are in the folder's
``prepare.json``), two modalities:

- ``audio``: the stored spectrogram (16 kHz, 10 s, n_fft 512, hop 160, ``log(|STFT| + 1e-7)``) as
  ``(1, 257, T)`` float32 (T = 1001 with the default prepare options; the official pickles hold 1004);
- ``visual``: ``frames`` frames of the clip's 1 fps frame folder as ``(frames, 3, image_size, image_size)``,
  ImageNet-normalised. Training: ``frames`` distinct random positions, sorted, then one RandomResizedCrop
  and one random horizontal flip for the whole clip; evaluation: evenly spaced positions and
  Resize((``image_size``, ``image_size``)).

Every random draw comes from the per-sample generator of the training split. The split is the one saved
by the preparer. Default encoders: the official pair, two ResNet18 from scratch with GELU (audio 1 input
channel; visual 3, run on the frames as one batch and average-pooled over frames and space).

Differences from the official loader: its frame choice ignores the random indices it draws and reads the
first files in ``os.listdir`` order (spec B11); here positions are random in training and evenly spaced
in evaluation. Its torchvision transform draws a crop and a flip per frame; here one crop and flip is
shared by the clip's frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..base import MultimodalDataset
from ..prepared import SpectrogramFramesReader
from ..registry import register_dataset
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, crop, maybe_hflip, normalize, resize, resized_crop_box
from .prepare import DATASET

FREQUENCIES = 257


def clip_transform(clip: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """``(T, 3, H, W)`` frames in [0, 1] to ``(T, 3, size, size)``, ImageNet-normalised.

    Training (a generator): one RandomResizedCrop box and one horizontal flip draw for all frames;
    evaluation (``None``): Resize((size, size)).
    """
    if generator is None:
        clip = resize(clip, size)
    else:
        box = resized_crop_box(clip.shape[-2], clip.shape[-1], generator)
        clip = maybe_hflip(resize(crop(clip, box), size), generator)
    return normalize(clip, IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class KineticsSoundsReader(SpectrogramFramesReader):
    """Reads clip ``i`` of a prepared Kinetics-Sounds folder: ``reader(i, generator) -> {"audio",
    "visual"}``; ``spectrogram_shape`` is the shape ``prepare.json`` records (``None``: ``(257, T)``)."""

    frames: int = 3
    spectrogram_shape: tuple[int, int] | None = None
    dataset: ClassVar[str] = DATASET

    def spectrogram_problem(self, spec: Tensor) -> str | None:
        expected = self.spectrogram_shape
        if spec.dim() != 2 or spec.shape[0] != FREQUENCIES or (expected and tuple(spec.shape) != expected):
            return f"holds shape {tuple(spec.shape)}, expected {expected or (FREQUENCIES, 'T')}"
        return None

    def transform_frames(self, images: list[Tensor], generator: torch.Generator | None) -> Tensor:
        """``(frames, 3, S, S)``, one crop and flip for the clip; frames of another size are resized to
        the first one's first."""
        size = images[0].shape[-2:]
        images = [im if im.shape[-2:] == size else resize(im, tuple(size)) for im in images]
        return clip_transform(torch.stack(images), self.image_size, generator)


def _spectrogram_shape(root: str) -> tuple[int, int] | None:
    """The spectrogram shape recorded in ``prepare.json`` (``None`` when absent or unreadable)."""
    try:
        info = json.loads((Path(root).expanduser() / "prepare.json").read_text())
        shape = info["spectrogram"]["shape"]
        return int(shape[0]), int(shape[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # load_prepared reports a missing or foreign folder


@register_dataset(DATASET)
def load_kinetics_sounds(
    *, root: str, seed: int = 0, frames: int = 3, image_size: int = 224
) -> MultimodalDataset:
    """Kinetics-Sounds from a folder prepared by ``equimodal prepare kinetics_sounds`` (see the module
    docstring).

    Args:
        root: the prepared folder (``--out`` of ``equimodal prepare kinetics_sounds``).
        seed: seeds the random training transforms (frame positions, crop, flip).
        frames: frames per clip (official: 3).
        image_size: side of the square frames (official: 224).

    Raises:
        FileNotFoundError / ValueError: ``root`` is not a prepared Kinetics-Sounds folder (naming the
            prepare command), an empty split, or ``frames`` / ``image_size`` below 1 / 8.
    """
    return KineticsSoundsReader.load(
        root,
        seed=seed,
        official_frames=3,
        frames=frames,
        image_size=image_size,
        spectrogram_shape=_spectrogram_shape(root),
    )
