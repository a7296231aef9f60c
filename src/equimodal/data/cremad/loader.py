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
from pathlib import Path

import torch
from torch import Tensor, nn

from ..base import MultimodalDataset
from ..media import MediaError, frame_positions, list_frames, read_npy, read_rgb
from ..prepared import ReaderFactory, Rows, load_prepared
from ..registry import register_dataset
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, maybe_hflip, normalize, random_resized_crop, resize
from .prepare import DATASET

MODALITIES = ("audio", "visual")
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
class CremadReader:
    """Reads clip ``i`` of a prepared CREMA-D folder: ``reader(i, generator) -> {"audio", "visual"}``.

    It holds paths and settings only, so it pickles into ``DataLoader`` workers.

    Frame choice: the official code draws a random subset of frame indices, sorts it and then ignores it,
    reading the first ``frames`` files in ``os.listdir`` order (spec B11: filesystem-dependent, never
    random). Here the frames are chosen as its intent says: in training ``frames`` distinct random
    positions, sorted (one frame: a random one), drawn from the sample's generator; in evaluation evenly
    spaced positions (one frame: the first), from the frame files sorted by name.
    """

    root: Path
    keys: tuple[str, ...]
    audio: tuple[str, ...]
    visual: tuple[str, ...]
    frames: int = 1
    image_size: int = 224

    def __call__(self, index: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"audio": self.read_audio(index), "visual": self.read_visual(index, generator)}

    def _fail(self, index: int, column: str, err: MediaError) -> ValueError:
        return ValueError(
            f"{self.root / 'manifest.csv'}: clip {self.keys[index]!r}, {column} file "
            f"{getattr(self, column)[index]!r} {err}. Rerun `equimodal prepare cremad` with the same --out "
            "after deleting that file or folder, so that it is prepared again."
        )

    def read_audio(self, index: int) -> Tensor:
        """The clip's spectrogram as ``(1, 257, 188)`` float32."""
        try:
            spec = read_npy(self.root / self.audio[index])
        except MediaError as err:
            raise self._fail(index, "audio", err) from err
        if tuple(spec.shape) != SPECTROGRAM_SHAPE:
            raise self._fail(
                index, "audio", MediaError(f"holds shape {tuple(spec.shape)}, not {SPECTROGRAM_SHAPE}")
            )
        return spec.unsqueeze(0)

    def read_visual(self, index: int, generator: torch.Generator | None) -> Tensor:
        """``frames`` transformed frames: ``(3, S, S)`` for one, ``(frames, 3, S, S)`` for more."""
        folder = self.root / self.visual[index]
        files = list_frames(folder) if folder.is_dir() else []
        try:
            if not files:
                raise MediaError("is not a folder holding frame images")
            chosen = frame_positions(len(files), self.frames, generator)
            clip = [frame_transform(read_rgb(files[i]), self.image_size, generator) for i in chosen]
        except MediaError as err:
            raise self._fail(index, "visual", err) from err
        return clip[0] if self.frames == 1 else torch.stack(clip)


def _reader(frames: int, image_size: int) -> ReaderFactory:
    """The factory :func:`load_prepared` calls with the manifest rows and the folder."""

    def build(rows: Rows, folder: Path) -> CremadReader:
        return CremadReader(
            folder,
            tuple(r["key"] for r in rows),
            tuple(r["audio"] for r in rows),
            tuple(r["visual"] for r in rows),
            frames=frames,
            image_size=image_size,
        )

    return build


def default_encoders() -> dict[str, nn.Module]:
    """The official CREMA-D pair: ResNet18 from scratch with GELU, 1 input channel (audio) and 3 (visual)."""
    from ...models.encoders import create_encoder

    return {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
    }


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
    if frames < 1:
        raise ValueError(f"frames must be >= 1 (official: 1), found {frames}.")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (official: 224), found {image_size}.")
    return load_prepared(
        DATASET,
        root,
        modalities=MODALITIES,
        reader=_reader(frames, image_size),
        encoders=default_encoders,
        seed=seed,
        info={"frames": frames, "image_size": image_size},
    )
