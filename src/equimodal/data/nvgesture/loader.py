"""``nvgesture``: NVGesture (25 hand gestures; RGB, depth and optical flow clips) from a prepared folder.

Prepare the folder first with ``equimodal prepare nvgesture --raw DIR --out DIR`` (layout:
:mod:`equimodal.data.nvgesture.prepare`). Each sample is three clips, channels first ``(C, T, H, W)``:

- ``rgb`` (C = 3): ImageNet mean/std normalised;
- ``depth`` (C = 1): scaled to [0, 1], not normalised;
- ``flow`` (C = 2): (dx, dy) in pixels of the prepared frames (dequantised).

Training takes ``frames`` consecutive frames starting at a random frame in [0, 16] and one random
``crop`` x ``crop`` box, the same window and box for the three modalities (the official recipe, no flip);
evaluation takes every prepared frame (80 by default) and the centre box. Default encoders: three
Inception-I3D (``i3d``, in_channels 3, 1 and 2), as the official model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...models.i3d import InceptionI3D
from ...prepare.base import read_layout
from ..base import MultimodalDataset
from ..prepared import Rows, load_prepared
from ..registry import register_dataset
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, Box, center_crop_box, frame_window, random_crop_box
from .prepare import COLUMNS, DATASET, dequantize_flow

MAX_START = 16
"""Latest first frame of a training window (official: start in [0, 16] of 80 frames)."""
IN_CHANNELS = {"rgb": 3, "depth": 1, "flow": 2}


@dataclass(frozen=True)
class NVGestureReader:
    """Reads one clip's rgb, depth and flow arrays with a shared frame window and crop box.

    Holds paths and settings only, so it pickles into ``DataLoader`` workers.

    Attributes:
        root: the prepared folder.
        files: per manifest row, the ``(rgb, depth, flow)`` paths relative to ``root``.
        frames: training window length.
        crop: side of the (random in training, centre otherwise) crop.
        flow_bound: the preparer's flow clip bound, to dequantise flow to pixels.
    """

    root: str
    files: tuple[tuple[str, str, str], ...]
    frames: int
    crop: int
    flow_bound: float

    def __call__(self, index: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        arrays = [self._load(path) for path in self.files[index]]
        self._check_shapes(index, arrays)
        length, height, width = arrays[0].shape[:3]
        times, box = self.window(length, height, width, generator)
        top, left, h, w = box
        rgb, depth, flow = (np.asarray(a[times, top : top + h, left : left + w]) for a in arrays)
        return {"rgb": _rgb(rgb), "depth": _depth(depth), "flow": self._flow(flow)}

    def window(
        self, length: int, height: int, width: int, generator: torch.Generator | None
    ) -> tuple[list[int], Box]:
        """Frame indices and crop box: random (start <= 16) in training, all frames and centre otherwise."""
        if generator is None:
            return list(range(length)), center_crop_box(height, width, self.crop)
        times = frame_window(length, self.frames, generator, max_start=MAX_START)
        return times, random_crop_box(height, width, self.crop, generator)

    def _load(self, relative: str) -> np.ndarray:
        path = Path(self.root) / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"NVGesture array {str(path)!r} is missing: the prepared folder is incomplete. Rerun "
                f"`equimodal prepare nvgesture --raw <release> --out {self.root}` (it resumes)."
            )
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # a truncated or foreign file
            raise ValueError(
                f"NVGesture array {str(path)!r} cannot be read ({type(err).__name__}: {err}); delete it and "
                f"rerun `equimodal prepare nvgesture` into {self.root} to write it again."
            ) from err

    def _check_shapes(self, index: int, arrays: list[np.ndarray]) -> None:
        rgb, depth, flow = arrays
        t, h, w = rgb.shape[:3]
        expected = ((t, h, w, 3), (t, h, w), (t, h, w, 2))
        if rgb.ndim != 4 or (rgb.shape, depth.shape, flow.shape) != expected:
            raise ValueError(
                f"NVGesture clip {self.files[index][0]!r}: rgb, depth and flow shapes {rgb.shape}, "
                f"{depth.shape}, {flow.shape} do not match (expected (T, H, W, 3), (T, H, W), (T, H, W, 2)); "
                "rerun `equimodal prepare nvgesture` into a new folder."
            )

    def _flow(self, stored: np.ndarray) -> Tensor:
        pixels = dequantize_flow(stored, self.flow_bound)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(3, 0, 1, 2)))


def _rgb(frames: np.ndarray) -> Tensor:
    """``(T, h, w, 3)`` uint8 -> ``(3, T, h, w)`` float, ImageNet-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2))).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return (x - mean) / std


def _depth(frames: np.ndarray) -> Tensor:
    """``(T, h, w)`` uint8 -> ``(1, T, h, w)`` float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0).unsqueeze(0)


def _check_sizes(root: Path, options: dict[str, Any], frames: int, crop: int) -> None:
    """Refuse a training window or crop larger than the prepared clips (names the prepared sizes)."""
    clip_frames, frame_size = int(options["clip_frames"]), int(options["frame_size"])
    if not 1 <= frames <= clip_frames:
        raise ValueError(
            f"nvgesture frames={frames}, but {str(root)!r} holds clips of {clip_frames} frames: pass "
            f"frames between 1 and {clip_frames} (official 64 of 80)."
        )
    if not 1 <= crop <= frame_size:
        raise ValueError(
            f"nvgesture crop={crop}, but {str(root)!r} holds {frame_size} x {frame_size} frames: pass crop "
            f"between 1 and {frame_size} (official 224 of 256)."
        )


def _reader(rows: Rows, folder: Path, *, frames: int, crop: int) -> NVGestureReader:
    """The reader factory of :func:`load_prepared`: settings from ``prepare.json``, paths from the rows."""
    _, info = read_layout(folder, DATASET)
    options = info["options"]
    _check_sizes(folder, options, frames, crop)
    files = tuple((r["rgb"], r["depth"], r["flow"]) for r in rows)
    return NVGestureReader(str(folder), files, frames, crop, float(options["flow_bound"]))


def default_encoders() -> dict[str, nn.Module]:
    """Three Inception-I3D from scratch: rgb (3 channels), depth (1), flow (2); 1024-d features each."""
    return {m: InceptionI3D(in_channels=c) for m, c in IN_CHANNELS.items()}


@register_dataset(DATASET)
def load_nvgesture(*, root: str, seed: int = 0, frames: int = 64, crop: int = 224) -> MultimodalDataset:
    """NVGesture from a folder written by ``equimodal prepare nvgesture`` (25 classes, rgb/depth/flow).

    Args:
        root: the prepared folder.
        seed: seeds the random training windows and crops.
        frames: consecutive frames per training clip (official 64; evaluation takes every frame).
        crop: side of the square crop (official 224 of 256: random in training, centre otherwise).

    Raises:
        FileNotFoundError / ValueError: not a prepared NVGesture folder, or ``frames`` / ``crop`` larger
            than the prepared clips.
    """
    return load_prepared(
        DATASET,
        root,
        modalities=list(COLUMNS),
        reader=partial(_reader, frames=frames, crop=crop),
        encoders=default_encoders,
        seed=seed,
        info={"frames": frames, "crop": crop, "max_start": MAX_START},
    )
