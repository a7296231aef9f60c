"""The ``cremad`` dataset: CREMA-D from a folder written by ``equimodal prepare cremad``.

Six emotions (classes in sorted order: ANG, DIS, FEA, HAP, NEU, SAD; the official code orders them NEU,
HAP, SAD, FEA, DIS, ANG, which only permutes the class indices), two modalities:

- ``audio``: the stored official spectrogram (22 050 Hz, 3 s, ``log(|STFT| + 1e-7)``) as ``(1, 257, 188)``
  float32;
- ``visual``: ``frames`` frames of the clip's 1 fps frame folder, ImageNet-normalised, ``(3, H, W)`` for
  one frame and ``(frames, 3, H, W)`` for more. Training: RandomResizedCrop(``image_size``) and a random
  horizontal flip per frame (as the official transform, applied to each frame); evaluation:
  Resize((``image_size``, ``image_size``)).

The split is the one saved by the preparer (actor-disjoint by default). Default encoders: the official
pair, two ResNet18 from scratch with GELU (audio 1 input channel, visual 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..base import MultimodalDataset
from ..prepared import SpectrogramFramesReader
from ..registry import register_dataset
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, maybe_hflip, normalize, random_resized_crop, resize
from .prepare import DATASET

SPECTROGRAM_SHAPE = (257, 188)


def frame_transform(image: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Training (a generator): RandomResizedCrop(size) + random horizontal flip; otherwise Resize((size,
    size)). Then ImageNet mean/std normalisation."""
    if generator is None:
        image = resize(image, size)
    else:
        image = maybe_hflip(random_resized_crop(image, size, generator), generator)
    return normalize(image, IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class CremadReader(SpectrogramFramesReader):
    """Reads clip ``i`` of a prepared CREMA-D folder: ``reader(i, generator) -> {"audio", "visual"}``.

    Frame choice: the official code draws a random subset of frame indices, sorts it and then ignores it,
    reading the first ``frames`` files in ``os.listdir`` order (spec B11: filesystem-dependent, never
    random). Here the frames are chosen as its intent says: in training ``frames`` distinct random
    positions, sorted (one frame: a random one), drawn from the sample's generator; in evaluation evenly
    spaced positions (one frame: the first), from the frame files sorted by name.
    """

    dataset: ClassVar[str] = DATASET

    def spectrogram_problem(self, spec: Tensor) -> str | None:
        if tuple(spec.shape) != SPECTROGRAM_SHAPE:
            return f"holds shape {tuple(spec.shape)}, not {SPECTROGRAM_SHAPE}"
        return None

    def transform_frames(self, images: list[Tensor], generator: torch.Generator | None) -> Tensor:
        """``(3, S, S)`` for one frame, ``(frames, 3, S, S)`` for more, each transformed on its own."""
        clip = [frame_transform(image, self.image_size, generator) for image in images]
        return clip[0] if self.frames == 1 else torch.stack(clip)


@register_dataset(DATASET)
def load_cremad(*, root: str, seed: int = 0, frames: int = 1, image_size: int = 224) -> MultimodalDataset:
    """CREMA-D from a folder prepared by ``equimodal prepare cremad`` (see the module docstring).

    Args:
        root: the prepared folder (``--out`` of ``equimodal prepare cremad``).
        seed: seeds the random training transforms (crop, flip, frame positions).
        frames: frames per clip (official: 1).
        image_size: side of the square frames (official: 224).

    Raises:
        FileNotFoundError / ValueError: ``root`` is not a prepared CREMA-D folder (naming the prepare
            command), an empty split, or ``frames`` / ``image_size`` below 1 / 8.
    """
    return CremadReader.load(root, seed=seed, official_frames=1, frames=frames, image_size=image_size)
