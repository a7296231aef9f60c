"""Per-modality encoders: each maps ``(B, ...)`` to a pooled feature ``(B, out_dim)``.

Every encoder exposes an integer ``out_dim`` (read by :class:`~equimodal.models.MultimodalClassifier`).
Build them by name with :func:`create_encoder`; :func:`list_encoders` gives the names.

Input layouts:

- ``mlp``: ``(B, in_dim)`` or any ``(B, ...)`` with ``in_dim`` elements per sample (flattened).
- ``cnn``, ``avd_image``: images ``(B, C, H, W)``.
- ``conv1d``, ``gru``, ``avd_audio``: sequences channels-first ``(B, C, T)`` (e.g. 13 MFCC channels by
  T frames), the layout of ``nn.Conv1d``; the GRU transposes internally.
- ``resnet18``: ``(B, C, H, W)``, or ``(B, T, C, H, W)`` for T frames per sample.
- ``transformer``: token sequences ``(B, T, D)``.

Convention for balancers that mask units (AMSS): a module carrying the attribute ``amss_skip = True`` is
left out of masking by default. The ResNet stem convolution and the 1x1 downsample convolutions carry
it, so they are recognised by attribute, never by parameter name. Mark your own modules the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from ..registry import Registry

EncoderFactory = Callable[..., nn.Module]
_FactoryT = TypeVar("_FactoryT", bound=EncoderFactory)
ConvLayer = tuple[int, int] | Literal["M"]
"""One step of a :class:`ConvEncoder`: ``(out_channels, kernel_size)`` or ``"M"`` (max-pool by 2)."""

ENCODERS: Registry[EncoderFactory] = Registry(
    "encoder",
    example="create_encoder({name!r}, {key}=...) or --set model.encoders.<modality>.{key}=...",
)


def register_encoder(name: str, *, overwrite: bool = False) -> Callable[[_FactoryT], _FactoryT]:
    """Decorator registering an encoder class or factory function under ``name``.

    The factory's keyword arguments become the encoder's options in :func:`create_encoder`; the module
    it returns must map ``(B, ...)`` to ``(B, out_dim)`` and expose an integer ``out_dim``.
    """
    return ENCODERS.decorator(name, overwrite=overwrite)  # type: ignore[return-value]


def list_encoders() -> list[str]:
    """Names of the registered encoders, sorted."""
    return ENCODERS.names()


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name``; unknown or mistyped options fail with the valid ones.

    Example:
        >>> enc = create_encoder("mlp", in_dim=10, hidden=(32, 16))
        >>> enc(torch.zeros(4, 10)).shape, enc.out_dim
        (torch.Size([4, 16]), 16)
    """
    return ENCODERS.create(name, **kwargs)


def _check_input(x: Tensor, ndims: Sequence[int], layout: str, owner: nn.Module) -> None:
    """Raise a ``ValueError`` naming the expected layout when ``x`` has the wrong number of dimensions."""
    if x.dim() not in ndims:
        raise ValueError(
            f"{type(owner).__name__} expects input of layout {layout}, found shape {tuple(x.shape)}. "
            "Reshape or permute the input to that layout."
        )


def _activation(name: str) -> nn.Module:
    """A fresh activation module: ``'relu'`` or ``'gelu'``."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', found {name!r}.")


def conv_bn_act(
    dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
) -> nn.Sequential:
    """Conv (no bias, 'same' padding for odd kernels) + BatchNorm + ReLU, in 1, 2 or 3 dimensions."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        norm(out_channels),
        nn.ReLU(),
    )


class ConvEncoder(nn.Module):
    """A stack of conv + BN + ReLU blocks and max-pools, then global average pooling.

    Args:
        dims: 1 for sequences ``(B, C, T)``, 2 for images ``(B, C, H, W)``.
        in_channels: input channels C.
        layers: steps in order, each ``(out_channels, kernel_size)`` or ``"M"`` for a max-pool by 2
            (``ceil_mode``, so odd and length-1 inputs still work).
    """

    def __init__(self, dims: int, in_channels: int, layers: Sequence[ConvLayer]) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"ConvEncoder supports dims 1 (sequences) or 2 (images), found {dims}.")
        if not any(step != "M" for step in layers):
            raise ValueError(
                f"ConvEncoder needs at least one (channels, kernel) layer, found {list(layers)}."
            )
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        blocks: list[nn.Module] = []
        channels = in_channels
        for step in layers:
            if step != "M" and not (isinstance(step, tuple) and len(step) == 2):
                raise ValueError(
                    f"Each ConvEncoder layer must be (out_channels, kernel_size) or 'M', found {step!r}."
                )
            if step == "M":
                blocks.append(pool(2, ceil_mode=True))
            else:
                out_channels, kernel = step
                blocks.append(conv_bn_act(dims, channels, out_channels, kernel))
                channels = out_channels
        self.dims = dims
        self.in_channels = in_channels
        self.body = nn.Sequential(*blocks)
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        layout = "(B, C, T)" if self.dims == 1 else "(B, C, H, W)"
        _check_input(x, (self.dims + 2,), layout, self)
        return self.body(x).flatten(2).mean(2)


def _pooled_stack(channels: Sequence[int], kernel_size: int) -> list[ConvLayer]:
    """``[(c1, k), "M", (c2, k), "M", ..., (cn, k)]``: a max-pool between consecutive blocks."""
    steps: list[ConvLayer] = []
    for i, c in enumerate(channels):
        steps += ["M"] if i else []
        steps.append((c, kernel_size))
    return steps


@register_encoder("cnn")
def cnn(in_channels: int = 1, channels: Sequence[int] = (16, 32), kernel_size: int = 3) -> ConvEncoder:
    """A small image CNN for ``(B, C, H, W)`` (works from 8x8 up); ``out_dim = channels[-1]``."""
    return ConvEncoder(2, in_channels, _pooled_stack(channels, kernel_size))


@register_encoder("conv1d")
def conv1d(in_channels: int = 13, channels: Sequence[int] = (32, 64), kernel_size: int = 5) -> ConvEncoder:
    """A Conv1d sequence encoder for ``(B, C, T)``, e.g. 13 MFCC channels; ``out_dim = channels[-1]``."""
    return ConvEncoder(1, in_channels, _pooled_stack(channels, kernel_size))


@register_encoder("avd_image")
def avd_image(in_channels: int = 1) -> ConvEncoder:
    """AVD-hard image encoder: Conv2d 1->32->32, MaxPool 2, 32->64->64 (3x3), global average pool (64-d)."""
    return ConvEncoder(2, in_channels, [(32, 3), (32, 3), "M", (64, 3), (64, 3)])


@register_encoder("avd_audio")
def avd_audio(in_channels: int = 13) -> ConvEncoder:
    """AVD-hard audio encoder: Conv1d 13->32 k5, MaxPool 2, 32->64 k5, MaxPool 2, 64->64 k3, pool (64-d)."""
    return ConvEncoder(1, in_channels, [(32, 5), "M", (64, 5), "M", (64, 3)])


@register_encoder("mlp")
class MLP(nn.Module):
    """Flatten, then ``Linear + ReLU + Dropout`` per hidden size; ``out_dim = hidden[-1]``.

    Args:
        in_dim: number of input features per sample (after flattening).
        hidden: sizes of the hidden layers; the last one is the feature size.
        dropout: dropout probability after each layer.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (64,), dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("MLP needs at least one hidden size, found hidden=(). Pass e.g. hidden=(64,).")
        layers: list[nn.Module] = []
        for d_in, d_out in zip([in_dim, *hidden[:-1]], hidden, strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        self.in_dim = in_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = int(hidden[-1])

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1) if x.dim() > 2 else x
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"MLP expects (B, {self.in_dim}) inputs (or (B, ...) with {self.in_dim} values per sample), "
                f"found shape {tuple(x.shape)}. Set in_dim to the number of features per sample."
            )
        return self.net(x)


@register_encoder("gru")
class GRUEncoder(nn.Module):
    """A GRU over channels-first sequences ``(B, C, T)`` (as Conv1d); the feature is the final hidden state.

    Args:
        in_channels: channels C per time step (e.g. 13 MFCCs).
        hidden_size: GRU hidden size.
        num_layers: stacked GRU layers.
        bidirectional: run both directions; ``out_dim`` is then ``2 * hidden_size``.
        dropout: dropout between stacked layers.

    Note: AMSS masks Conv/Linear/attention units only, so a GRU's weights are never masked.
    """

    def __init__(
        self,
        in_channels: int = 13,
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(
            in_channels,
            hidden_size,
            num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.directions = 2 if bidirectional else 1
        self.out_dim = hidden_size * self.directions

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (3,), "(B, C, T)", self)
        _, h = self.gru(x.transpose(1, 2))  # h: (layers * directions, B, hidden)
        return torch.cat(list(h[-self.directions :]), dim=1)


@register_encoder("transformer")
class TransformerEncoder(nn.Module):
    """A small pre-norm transformer over tokens ``(B, T, D)`` with a learned position embedding.

    The pooled token (class token or mean) goes through a final LayerNorm.

    Args:
        in_dim: token size D; projected to ``d_model``.
        d_model: model width and ``out_dim``.
        num_heads: attention heads (must divide ``d_model``).
        num_layers: encoder layers.
        dim_feedforward: hidden size of each layer's feed-forward block (default ``2 * d_model``).
        dropout: dropout inside the layers.
        pool: ``"cls"`` (a learned class token) or ``"mean"`` (mean over tokens).
        max_len: longest sequence accepted (size of the position embedding).
        layout: how the input becomes tokens: ``"tokens"`` (default: ``(B, T, D)`` as is),
            ``"channels_first"`` (a ``(B, D, T)`` sequence, e.g. MFCC frames stored for a Conv1d, is
            transposed) or ``"image_rows"`` (a ``(B, C, H, W)`` image: each of the H rows is a token of
            ``C * W`` values, so ``in_dim = C * W``).
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        pool: Literal["cls", "mean"] = "cls",
        max_len: int = 512,
        layout: Literal["tokens", "channels_first", "image_rows"] = "tokens",
    ) -> None:
        super().__init__()
        if layout not in ("tokens", "channels_first", "image_rows"):
            raise ValueError(f"layout must be 'tokens', 'channels_first' or 'image_rows', found {layout!r}.")
        self.layout = layout
        if d_model % num_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}); change one of them."
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', found {pool!r}.")
        self.proj = nn.Linear(in_dim, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, max_len + 1, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward or 2 * d_model, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.in_dim, self.num_heads, self.pool, self.max_len = in_dim, num_heads, pool, max_len
        self.out_dim = d_model

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "image_rows":
            _check_input(x, (4,), f"(B, C, H, W) with C * W = {self.in_dim}", self)
            x = x.permute(0, 2, 1, 3).flatten(2)
        elif self.layout == "channels_first":
            _check_input(x, (3,), f"(B, {self.in_dim}, T)", self)
            x = x.transpose(1, 2)
        _check_input(x, (3,), f"(B, T, {self.in_dim})", self)
        if x.shape[1] > self.max_len:
            raise ValueError(
                f"TransformerEncoder got {x.shape[1]} tokens, more than max_len={self.max_len}. "
                "Build it with a larger max_len or shorten the sequences."
            )
        h = self.proj(x)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        h = self.encoder(h + self.pos[:, : h.shape[1]])
        return self.norm(h[:, 0] if self.cls is not None else h.mean(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, a residual (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = _activation(activation)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            conv.amss_skip = True
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.downsample(x))


@register_encoder("resnet18")
class ResNet18(nn.Module):
    """ResNet18 from scratch, for spectrograms ``(B, 1, F, T)``, images, or frames ``(B, T, C, H, W)``.

    Multi-frame input runs through the 2-D network as ``B * T`` images and the feature maps are
    average-pooled over frames and space together, as in AMSS's Kinetics-Sounds model.
    Convolutions use Kaiming-normal (fan_out) init and BatchNorm weights ~ N(1, 0.02), as AMSS's code.

    Args:
        in_channels: input channels (1 for a spectrogram, 3 for RGB).
        activation: ``"relu"`` (torchvision) or ``"gelu"`` (AMSS's official code).
        base_channels: width of layer 1; layers 1-4 have 1x, 2x, 4x, 8x this (64 gives the standard
            64/128/256/512); ``out_dim = 8 * base_channels``.
    """

    def __init__(self, in_channels: int = 3, activation: str = "relu", base_channels: int = 64) -> None:
        super().__init__()
        c = base_channels
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c, 7, 2, 3, bias=False),
            nn.BatchNorm2d(c),
            _activation(activation),
            nn.MaxPool2d(3, 2, 1),
        )
        self.stem[0].amss_skip = True
        layers: list[nn.Module] = []
        width = c
        for i, out in enumerate((c, 2 * c, 4 * c, 8 * c)):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(BasicBlock(width, out, stride, activation), BasicBlock(out, out, 1, activation))
            )
            width = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_dim = 8 * c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (4, 5), "(B, C, H, W) or (B, T, C, H, W)", self)
        frames = x.shape[1] if x.dim() == 5 else 1
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"ResNet18 was built for {self.in_channels} input channels, found {x.shape[-3]} in shape "
                f"{tuple(x.shape)}. Frames go as (B, T, C, H, W); set in_channels to C."
            )
        h = self.stem(x.flatten(0, 1) if x.dim() == 5 else x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        h = h.unflatten(0, (-1, frames))  # (B, T, C', h, w)
        return h.mean((1, 3, 4))


@register_encoder("text_embedding")
class TextEmbedding(nn.Module):
    """A bag-of-embeddings text encoder for token ids ``(B, L)`` (long, id 0 = padding).

    Embeds every token (``nn.Embedding(vocab_size, dim, padding_idx=0)``), averages over the non-padding
    tokens (an all-padding row gives zeros), then ``Linear(dim, dim) + ReLU``; ``out_dim = dim``.

    Args:
        vocab_size: number of token ids (every id must be below it), e.g. a tokenizer's vocabulary size.
        dim: embedding and feature size.
    """

    def __init__(self, vocab_size: int, dim: int = 64) -> None:
        super().__init__()
        if vocab_size < 2 or dim < 1:
            raise ValueError(
                f"TextEmbedding needs vocab_size >= 2 and dim >= 1, found vocab_size={vocab_size}, dim={dim}."
            )
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.vocab_size = vocab_size
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, (2,), "(B, L) token ids", self)
        if x.is_floating_point() or x.is_complex():
            raise TypeError(f"TextEmbedding expects integer token ids, found dtype {x.dtype}.")
        mask = (x != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(x) * mask).sum(1)
        return self.proj(summed / mask.sum(1).clamp_min(1.0))
