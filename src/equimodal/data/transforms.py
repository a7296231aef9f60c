"""Image and clip transforms for the readers of on-disk datasets, written on plain tensors.

Random transforms draw only from the ``torch.Generator`` they are given (the per-sample generator of a
training :class:`~equimodal.data.base.FileSplit`), never from a global RNG, so a run is the same for any
number of ``DataLoader`` workers. Images are float tensors ``(C, H, W)`` in [0, 1]; clips are
``(T, C, H, W)``. The semantics follow torchvision's transforms of the same names, which the official
pipelines use (torchvision itself is not a dependency).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # top, left, height, width


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def resize(image: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize (with antialiasing) of ``(C, H, W)`` or ``(T, C, H, W)`` to ``size`` (an int: square)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    batched = image if image.dim() == 4 else image[None]
    out = F.interpolate(batched, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out if image.dim() == 4 else out[0]


def resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A random crop box of ``RandomResizedCrop``: area fraction in ``scale``, log-uniform aspect ``ratio``.

    Ten tries as torchvision makes them, then the central crop of the nearest admissible ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop(image: Tensor, box: Box) -> Tensor:
    """The ``box`` (top, left, height, width) of an image or clip (last two dims are H, W)."""
    top, left, h, w = box
    return image[..., top : top + h, left : left + w]


def random_resized_crop(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """``RandomResizedCrop(size)``: a random box (:func:`resized_crop_box`) resized to ``size x size``."""
    return resize(crop(image, resized_crop_box(image.shape[-2], image.shape[-1], generator)), size)


def random_crop_box(height: int, width: int, size: int, generator: torch.Generator) -> Box:
    """A random ``size x size`` box inside ``height x width`` (the whole image when it is smaller)."""
    h, w = min(size, height), min(size, width)
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    return top, left, h, w


def center_crop_box(height: int, width: int, size: int) -> Box:
    """The central ``size x size`` box (the whole image when it is smaller)."""
    h, w = min(size, height), min(size, width)
    return (height - h) // 2, (width - w) // 2, h, w


def maybe_hflip(image: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip left-right with probability ``p`` (one draw for the whole image or clip)."""
    return image.flip(-1) if _uniform(generator) < p else image


def normalize(image: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel (channel dim -3)."""
    m = torch.tensor(mean, dtype=image.dtype)[:, None, None]
    s = torch.tensor(std, dtype=image.dtype)[:, None, None]
    return (image - m) / s


def frame_window(
    available: int, length: int, generator: torch.Generator | None, max_start: int | None = None
) -> list[int]:
    """Indices of ``length`` consecutive frames: a random start in training, the centred window otherwise.

    ``max_start`` bounds the random start (NVGesture's recipe: start in [0, 16] of 80 frames). A clip with
    fewer frames than ``length`` repeats its last frame.
    """
    last_start = max(0, available - length)
    if generator is None:
        start = last_start // 2
    else:
        bound = last_start if max_start is None else min(last_start, max_start)
        start = int(torch.randint(0, bound + 1, (), generator=generator))
    return [min(start + i, available - 1) for i in range(length)]
