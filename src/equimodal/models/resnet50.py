"""``resnet50``: a ResNet-50 image encoder whose parameter names follow torchvision's ``resnet50``.

The network (written here; torchvision is not a dependency) is torchvision's ResNet-50 v1.5: a 7x7
stride-2 stem with max-pool, bottleneck blocks 3-4-6-3 (1x1, 3x3 with the stride, 1x1 to 4x width),
global average pooling to 2048-d. Its ``state_dict`` keys are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1`` ... ``layer4.2.bn3``, ``layerN.0.downsample.0/1``, ``fc``), so ``weights=PATH`` loads
a torchvision-format state dict saved to a local file (e.g. ``torch.save(resnet50(weights=
"IMAGENET1K_V2").state_dict(), "resnet50.pth")`` on a machine with torchvision; nothing is downloaded
here). ``fc`` is the AMSS text-image projection ``Linear(2048, 256)`` (``out_dim``), never loaded.

For AMSS the stem convolution and the downsample convolutions carry ``amss_skip = True``, so the
masked units are the output filters of conv1/conv2/conv3 of the 16 bottlenecks, as in the official
code (its BatchNorms, biases and ``fc`` are never masked).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .encoders import _check_input, register_encoder

log = logging.getLogger(__name__)

BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
FEATURES = WIDTHS[-1] * EXPANSION  # 2048


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: the stride sits on the 3x3 conv), same attribute names."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out:
            conv = nn.Conv2d(in_channels, out, 1, stride, bias=False)
            conv.amss_skip = True
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + identity)


@register_encoder("resnet50")
class ResNet50(nn.Module):
    """ResNet-50 for images ``(B, C, H, W)``: 2048-d pooled features, then the official ``Linear(2048, 256)``.

    Args:
        in_channels: input channels (3 for RGB; pretrained weights need 3).
        out_dim: size of the projection ``fc = Linear(2048, out_dim)`` (AMSS text-image: 256); ``None``:
            no projection, ``out_dim = 2048``.
        weights: a local file holding a torchvision-format ``resnet50`` state dict (``torch.save``), loaded
            into everything but ``fc``. ``None``: random init (torchvision's: Kaiming-normal fan-out convs,
            BatchNorm weight 1, bias 0). The official model starts from ImageNet ``IMAGENET1K_V2``.

    Raises:
        FileNotFoundError: ``weights`` names no file.
        ValueError: the file is not a state dict, or it has missing, unexpected or mis-shaped keys
            (named in the message).
    """

    def __init__(self, in_channels: int = 3, out_dim: int | None = 256, weights: str | None = None) -> None:
        super().__init__()
        if in_channels < 1 or (out_dim is not None and out_dim < 1):
            raise ValueError(
                f"ResNet50 needs in_channels >= 1 and out_dim >= 1 (or None), found in_channels={in_channels}, "
                f"out_dim={out_dim}."
            )
        if weights is not None:
            _weights_file(weights)  # fail before building 25 M parameters
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.conv1.amss_skip = True
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for i, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS, strict=True)):
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(channels, width, 2 if i and not j else 1))
                channels = width * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Identity() if out_dim is None else nn.Linear(FEATURES, out_dim)
        self.out_dim = FEATURES if out_dim is None else int(out_dim)
        self._init_weights()
        if weights is not None:
            self.load_torchvision(weights)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The 2048-d globally pooled features (before ``fc``)."""
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(self, name)(h)
        return self.avgpool(h).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (4,), "(B, C, H, W)", self)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNet50 was built for {self.in_channels} input channels, found {x.shape[1]} in shape "
                f"{tuple(x.shape)}; set in_channels to C."
            )
        return self.fc(self.features(x))

    def load_torchvision(self, path: str | Path) -> None:
        """Load a torchvision-format ``resnet50`` state dict from a local file into all but ``fc``.

        Keys ``fc.*`` are ignored (the torchvision classifier is 1000-way; ours is the projection). A
        ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a DDP ``module.`` prefix are accepted.
        """
        file = _weights_file(path)
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        state = _unwrap(loaded, file)
        self._check_keys(state, file)
        own = {k: v for k, v in state.items() if not k.startswith("fc.")}
        self.load_state_dict(own, strict=False)
        log.info("ResNet50: loaded %d tensors from %s (fc.* ignored)", len(own), file)

    def _check_keys(self, state: Mapping[str, Tensor], file: Path) -> None:
        expected = {k: v for k, v in self.state_dict().items() if not k.startswith("fc.")}
        given = {k for k in state if not k.startswith("fc.")}
        missing, unexpected = sorted(set(expected) - given), sorted(given - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"ResNet50 weights {str(file)!r} do not match torchvision's resnet50 naming: missing keys "
                f"{_few(missing)}, unexpected keys {_few(unexpected)}. Save the state dict of a torchvision "
                "`resnet50` (torch.save(model.state_dict(), PATH))."
            )
        shapes = [
            f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if tuple(state[k].shape) != tuple(v.shape)
        ]
        if shapes:
            raise ValueError(
                f"ResNet50 weights {str(file)!r} have mis-shaped tensors: {_few(shapes)}. The file is not a "
                f"resnet50 for {self.in_channels} input channels."
            )


def _weights_file(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"ResNet50 weights {str(file)!r} not found: pass a local file holding a torchvision resnet50 "
            "state dict (model.encoders.image.weights=PATH or data.options.resnet50=PATH)."
        )
    return file


def _unwrap(loaded: object, file: Path) -> dict[str, Tensor]:
    """The state dict inside ``loaded`` (plain, or under ``state_dict`` / ``model``), without ``module.``."""
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"ResNet50 weights {str(file)!r} hold {type(loaded).__name__}, not a state dict of tensors; save "
            "one with torch.save(model.state_dict(), PATH)."
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in loaded.items()}


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"
