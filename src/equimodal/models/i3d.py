"""Inception-I3D (Carreira & Zisserman, 2017) as a clip encoder: ``(B, C, T, H, W)`` -> ``(B, 1024 * width)``.

The network is the inflated Inception-v1 of "Quo Vadis, Action Recognition?", laid out as in the widely
used PyTorch port of the DeepMind release, so that its state dicts load by name:

    Conv3d_1a_7x7 (stride 2) - MaxPool3d_2a_3x3 (1x3x3, stride 1x2x2) - Conv3d_2b_1x1 - Conv3d_2c_3x3 -
    MaxPool3d_3a_3x3 (1x3x3, stride 1x2x2) - Mixed_3b - Mixed_3c - MaxPool3d_4a_3x3 (3x3x3, stride 2) -
    Mixed_4b ... Mixed_4f - MaxPool3d_5a_2x2 (2x2x2, stride 2) - Mixed_5b - Mixed_5c - average pool

Every convolution is a ``Unit3D`` (``conv3d`` without bias, ``bn`` with eps 1e-3 and momentum 0.01, ReLU)
and every Inception block has the branches ``b0`` (1x1), ``b1a``/``b1b`` (1x1, 3x3x3), ``b2a``/``b2b``
(1x1, 3x3x3) and ``b3a``/``b3b`` (3x3x3 max-pool, 1x1), so the parameters are named as in that port
(``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_mean``, ...). Convolutions and pools use
TensorFlow's "SAME" padding, computed from the input size at run time (asymmetric when the total is odd).

Deviations, all deliberate:

- The feature is the global average over (T, H, W) of Mixed_5c. The official NVGesture model applies
  ``AvgPool3d((8, 7, 7))``; for its 64 x 224 x 224 training clips Mixed_5c is exactly 8 x 7 x 7, so both
  give the same 1024 numbers, and global pooling also works for the 80-frame test clips and any size.
- There is no dropout and no logits layer (the fusion head classifies); a checkpoint's ``logits.*``
  entries are ignored when loading.
- Max-pools pad with zeros; they always follow a ReLU, so this equals TensorFlow's padding (which ignores
  padded positions).
- ``width_multiplier`` scales every channel count (rounded, at least 1) so narrow versions run on a CPU.
- No convolution carries ``amss_skip``: the official NVGesture code means to mask every I3D convolution
  (spec sections 9 and 14, B3), so AMSS finds all 57 ``Conv3d`` units automatically. Mark a module with
  ``amss_skip = True`` yourself to keep it out of masking.

Weights: ``weights=`` loads a local state dict (e.g. the port's ``rgb_imagenet.pt`` / ``flow_imagenet.pt``)
strictly; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import register_encoder

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# Inception blocks: (name, branch widths (b0, b1a, b1b, b2a, b2b, b3b)), in order; pools between them.
MIXED: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
POOLS_BEFORE: dict[str, tuple[str, Triple, Triple]] = {
    "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
}
IGNORED_PREFIXES = ("logits.",)


def same_padding(size: Sequence[int], kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """TensorFlow "SAME" padding of a ``(T, H, W)`` input, in ``F.pad`` order (W first, front then back).

    The total along a dimension is ``max(k - s, 0)`` when the size is a multiple of the stride, else
    ``max(k - size % s, 0)``; the back gets the extra one when it is odd.
    """
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride), strict=True):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Unit3D(nn.Module):
    """Conv3d ("SAME" padding, no bias) + BatchNorm3d (eps 1e-3, momentum 0.01) + ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1)
    ) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, same_padding(x.shape[-3:], self.kernel, self.stride))
        return F.relu(self.bn(self.conv3d(x)))


class MaxPool3dSame(nn.Module):
    """MaxPool3d with "SAME" padding (zeros: its inputs are non-negative, after a ReLU)."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.pool = nn.MaxPool3d(kernel, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(F.pad(x, same_padding(x.shape[-3:], self.kernel, self.stride)))


class InceptionBlock(nn.Module):
    """An inflated Inception block: four branches concatenated on channels (``out_channels`` in total)."""

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = widths
        k3 = (3, 3, 3)
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, k3)
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, k3)
        self.b3a = MaxPool3dSame(k3, (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3b)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        return torch.cat(branches, dim=1)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


@register_encoder("i3d")
class InceptionI3D(nn.Module):
    """Inception-I3D from scratch (or from a local state dict): clips ``(B, C, T, H, W)`` -> ``(B, out_dim)``.

    Args:
        in_channels: input channels C (3 for RGB, 2 for optical flow, 1 for depth).
        width_multiplier: scales every channel count (rounded, at least 1); ``out_dim`` is Mixed_5c's
            width, 1024 at 1.0 (64 at 0.0625).
        weights: a local ``torch.save`` state dict named as the common PyTorch I3D port
            (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b0.conv3d.weight``, ...), loaded strictly; its
            ``logits.*`` entries are ignored. ``None``: random initialisation (PyTorch's defaults).

    Any clip with at least one frame and pixel works; 64 x 224 x 224 gives an 8 x 7 x 7 Mixed_5c map.
    """

    def __init__(
        self, in_channels: int = 3, width_multiplier: float = 1.0, weights: str | None = None
    ) -> None:
        super().__init__()
        if not (isinstance(in_channels, int) and in_channels >= 1):
            raise ValueError(f"i3d in_channels must be a positive integer, found {in_channels!r}.")
        if not width_multiplier > 0:
            raise ValueError(
                f"i3d width_multiplier must be positive, found {width_multiplier!r} (1.0 is the full network)."
            )
        self.in_channels, self.width_multiplier = in_channels, float(width_multiplier)

        def c(n: int) -> int:
            return _scaled(n, width_multiplier)

        self.Conv3d_1a_7x7 = Unit3D(in_channels, c(64), (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c(64), c(64))
        self.Conv3d_2c_3x3 = Unit3D(c(64), c(192), (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = c(192)
        for name, widths in MIXED.items():
            if name in POOLS_BEFORE:
                pool, kernel, stride = POOLS_BEFORE[name]
                self.add_module(pool, MaxPool3dSame(kernel, stride))
            block = InceptionBlock(channels, [c(w) for w in widths])
            self.add_module(name, block)
            channels = block.out_channels
        self.out_dim = channels
        if weights is not None:
            load_i3d_weights(self, weights)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"InceptionI3D expects clips (B, {self.in_channels}, T, H, W), found shape {tuple(x.shape)}. "
                "Clips go channels first, then frames; set in_channels to C."
            )
        for module in self.children():
            x = module(x)
        return x.mean(dim=(2, 3, 4))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A ``torch.save``-d state dict (tensors only) from ``path``, on the CPU."""
    if not path.is_file():
        raise FileNotFoundError(
            f"i3d weights {str(path)!r} do not exist: pass a local state dict file (nothing is downloaded)."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of a file that is not a state dict
        raise ValueError(f"i3d weights {str(path)!r} cannot be read by torch.load ({err}).") from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise TypeError(
            f"i3d weights {str(path)!r} hold a {type(loaded).__name__}, expected a state dict (parameter "
            "name -> tensor) as saved by torch.save(model.state_dict(), path)."
        )
    return dict(loaded)


def _key_problems(model: nn.Module, given: Mapping[str, Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``model``, as sentences."""
    own = model.state_dict()
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    shapes = [
        f"{k}: file {tuple(given[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in given and given[k].shape != own[k].shape
    ]
    problems = []
    for what, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if keys:
            more = f" (and {len(keys) - 8} more)" if len(keys) > 8 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:8])}{more}")
    return problems


def load_i3d_weights(model: InceptionI3D, path: str | Path) -> None:
    """Load a local state dict into ``model`` strictly (``logits.*`` ignored; old files without
    ``num_batches_tracked`` accepted).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the keys or shapes do not match (the message names them and how to fix them).
    """
    path = Path(path).expanduser()
    given = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(IGNORED_PREFIXES)}
    problems = _key_problems(model, given)
    if problems:
        hint = ""
        if given and all(k.startswith("module.") for k in given):
            hint = " The keys start with 'module.' (saved from DataParallel): strip that prefix first."
        elif any("shape" in p for p in problems):
            hint = (
                " A stem shape mismatch means other input channels: build with the file's in_channels, or "
                "adapt Conv3d_1a_7x7.conv3d.weight (e.g. average it over dim 1 for depth) and save again."
            )
        raise ValueError(
            f"i3d weights {str(path)!r} do not match InceptionI3D(in_channels={model.in_channels}, "
            f"width_multiplier={model.width_multiplier}): {'; '.join(problems)}.{hint}"
        )
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in given:
            given[k] = torch.zeros_like(v)
    model.load_state_dict(given, strict=True)
    log.info("loaded i3d weights from %s (%d tensors)", path, len(given))
