"""Loading a folder written by ``equimodal prepare <dataset>`` (layout: :mod:`equimodal.prepare.base`).

A dataset's loader (``cremad``, ``kinetics_sounds``, ...) calls :func:`load_prepared` with a *reader
factory*: given the manifest rows and the folder, it returns the ``reader(row_index, generator)`` of
:class:`~equimodal.data.base.FileSplit` that reads one clip with the dataset's own transforms (random in
training, deterministic otherwise). Splits come from the manifest's ``split`` column (saved by the
preparer); class indices follow the sorted class names recorded in ``prepare.json``, so they are the same
for every split choice.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..prepare.base import read_layout
from .base import FileSplit, MultimodalDataset, Reader
from .media import MediaError, choose_frames, read_npy, read_rgb
from .splits import check_seed

Rows = list[dict[str, str]]
ReaderFactory = Callable[[Rows, Path], Reader]


def read_rows(manifest: Path) -> Rows:
    """The manifest's rows as dicts (``key``, ``label``, ``split`` and one entry per modality)."""
    with manifest.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_prepared(
    dataset: str,
    root: str | Path,
    *,
    modalities: Sequence[str],
    reader: ReaderFactory,
    encoders: Callable[[], dict[str, nn.Module]],
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> MultimodalDataset:
    """A :class:`MultimodalDataset` of :class:`FileSplit` over a prepared folder.

    Args:
        dataset: the dataset's name (checked against ``prepare.json``).
        root: the prepared folder.
        modalities: the manifest columns to read, in order.
        reader: builds the per-clip reader from the rows and the folder.
        encoders: builds the default encoders.
        seed: seeds the random training transforms.
        info: extra provenance to record.

    Raises:
        FileNotFoundError / ValueError: not a prepared folder of ``dataset`` (naming the prepare command),
            a modality column missing from its manifest, or an empty split.
    """
    seed = check_seed(seed)
    manifest, prepared = read_layout(Path(root), dataset)
    rows = read_rows(manifest)
    missing = [m for m in modalities if rows and m not in rows[0]]
    if missing:
        raise ValueError(
            f"{manifest}: no column for modality {missing} (columns: {list(rows[0]) if rows else []}); "
            f"rerun `equimodal prepare {dataset}` with the options that write it."
        )
    classes = list(prepared["classes"])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    read = reader(rows, manifest.parent)
    splits = {}
    for name in ("train", "val", "test"):
        rows_of = np.array([i for i, r in enumerate(rows) if r["split"] == name], dtype=np.int64)
        if rows_of.size == 0:
            raise ValueError(
                f"{manifest}: the {name} split is empty. Rerun `equimodal prepare {dataset}` (it saves train, "
                "val and test), or check the split options it was given."
            )
        splits[name] = FileSplit(
            read,
            torch.from_numpy(rows_of),
            torch.from_numpy(labels[rows_of]),
            train=name == "train",
            seed=seed,
        )
    return MultimodalDataset(
        name=dataset,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(classes),
        modalities=list(modalities),
        default_encoders=encoders,
        class_names=classes,
        info={"root": str(Path(root)), "prepared": prepared, **(info or {})},
    )


@dataclass(frozen=True)
class SpectrogramFramesReader:
    """Reads clip ``i`` of a prepared folder that stores a spectrogram (``.npy``) and a frame folder per
    clip (``cremad``, ``kinetics_sounds``): ``reader(i, generator) -> {"audio", "visual"}``.

    It holds paths and settings only, so it pickles into ``DataLoader`` workers. A subclass names its
    ``dataset`` and writes the two parts that are its own: :meth:`spectrogram_problem` (the shape its
    preparer writes) and :meth:`transform_frames` (its training and evaluation transforms). A file that
    cannot be read raises ``ValueError`` naming the manifest, the clip and the file, and the fix.
    """

    root: Path
    keys: tuple[str, ...]
    audio: tuple[str, ...]
    visual: tuple[str, ...]
    frames: int = 1
    image_size: int = 224
    dataset: ClassVar[str] = ""

    @classmethod
    def factory(cls, **settings: Any) -> ReaderFactory:
        """The factory :func:`load_prepared` calls with the manifest rows and the folder."""

        def build(rows: Rows, folder: Path) -> SpectrogramFramesReader:
            columns = (tuple(r[c] for r in rows) for c in ("key", "audio", "visual"))
            return cls(folder, *columns, **settings)

        return build

    @classmethod
    def load(cls, root: str | Path, *, seed: int, official_frames: int, **settings: Any) -> MultimodalDataset:
        """The dataset of ``root`` read with this reader (``settings``: ``frames``, ``image_size`` and
        the subclass's own), after checking ``frames`` >= 1 and ``image_size`` >= 8."""
        frames, image_size = settings["frames"], settings["image_size"]
        if frames < 1:
            raise ValueError(f"frames must be >= 1 (official: {official_frames}), found {frames}.")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (official: 224), found {image_size}.")
        return load_prepared(
            cls.dataset,
            root,
            modalities=("audio", "visual"),
            reader=cls.factory(**settings),
            encoders=resnet18_pair,
            seed=seed,
            info={"frames": frames, "image_size": image_size},
        )

    def __call__(self, index: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"audio": self.read_audio(index), "visual": self.read_visual(index, generator)}

    def spectrogram_problem(self, spec: Tensor) -> str | None:
        """What is wrong with a stored spectrogram's shape (``None``: nothing)."""
        raise NotImplementedError

    def transform_frames(self, images: list[Tensor], generator: torch.Generator | None) -> Tensor:
        """The chosen frames (``(3, H, W)`` each, in [0, 1]) as the visual input."""
        raise NotImplementedError

    def read_audio(self, index: int) -> Tensor:
        """The clip's stored spectrogram as ``(1, F, T)`` float32."""
        try:
            spec = read_npy(self.root / self.audio[index])
            problem = self.spectrogram_problem(spec)
            if problem:
                raise MediaError(problem)
        except MediaError as err:
            raise self._fail(index, "audio", err) from err
        return spec.unsqueeze(0)

    def read_visual(self, index: int, generator: torch.Generator | None) -> Tensor:
        """``frames`` frames of the clip's folder, chosen by :func:`~equimodal.data.media.frame_positions`
        (random in training, evenly spaced otherwise; a folder with fewer repeats its last one)."""
        try:
            images = [
                read_rgb(path)
                for path in choose_frames(self.root / self.visual[index], self.frames, generator)
            ]
        except MediaError as err:
            raise self._fail(index, "visual", err) from err
        return self.transform_frames(images, generator)

    def _fail(self, index: int, column: str, err: MediaError) -> ValueError:
        return ValueError(
            f"{self.root / 'manifest.csv'}: clip {self.keys[index]!r}, {column} file "
            f"{getattr(self, column)[index]!r} {err}. Delete that file or folder and rerun `equimodal prepare "
            f"{self.dataset}` with the same --out and options, so that the clip is prepared again."
        )


def resnet18_pair() -> dict[str, nn.Module]:
    """The official encoders of CREMA-D and Kinetics-Sounds: ResNet18 from scratch with GELU, 1 input
    channel for ``audio`` and 3 for ``visual`` (several frames run as one batch, pooled over frames and
    space)."""
    from ..models.encoders import create_encoder

    return {
        "audio": create_encoder("resnet18", in_channels=1, activation="gelu"),
        "visual": create_encoder("resnet18", in_channels=3, activation="gelu"),
    }
