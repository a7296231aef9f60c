"""Fusion heads that return fused logits and *exact* per-modality (unimodal) logits.

Every fusion maps ``features: dict[str, Tensor]`` (pooled ``(B, d_m)`` per modality, in modality
order) to ``(fused_logits, unimodal_logits)``.

- ``concat``: ``z = W[h_1; ...; h_M] + b`` and ``z_m = W[:, block_m] h_m + b / M``; the unimodal
  logits sum exactly to the fused logits.
- ``sum``: each modality has its own linear head, ``z = sum_m z_m``.
- ``weighted``: own heads, ``z = sum_m w_m z_m`` with ``w = M * softmax(alpha)`` learnable.
- ``channel`` (MMTM): each modality's own head on its channel-recalibrated features, fused as the
  *mean* ``z = (1/M) sum_m z_m``; the unimodal logits are exactly those terms.
- ``film``, ``gated``, ``attention``, ``affine``, ``ml_lstm``: cannot be split into per-modality
  terms, so they carry auxiliary per-modality linear heads on *detached* features
  (``auxiliary = True``); the base balancer trains those heads with their own CE, which never
  reaches the encoders or the fusion.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..registry import Registry

FusionOutput = tuple[Tensor, dict[str, Tensor]]


class Fusion(nn.Module):
    """Base class of fusion heads.

    Args:
        dims: feature dimension of each modality, in modality order.
        num_classes: number of classes C.
    """

    auxiliary: ClassVar[bool] = False

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"A fusion needs at least 2 modalities, found {list(dims)}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, found {num_classes}.")
        self.dims = dict(dims)
        self.modalities = list(dims)
        self.num_classes = int(num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        """Per modality, a weight of the head and the column slice that belongs to it (may be empty)."""
        return {}


FUSIONS: Registry[type[Fusion]] = Registry(
    "fusion", base=Fusion, skip=2, example="create_fusion({name!r}, dims, num_classes, {key}=...)"
)


def register_fusion(name: str, *, overwrite: bool = False) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator registering a :class:`Fusion` subclass under ``name`` (it also sets ``cls.name``)."""
    return FUSIONS.decorator(name, overwrite=overwrite)


def _label(fusion: Fusion) -> str:
    """The registered name of ``fusion``'s class, or the class name for an unregistered subclass."""
    return getattr(type(fusion), "name", type(fusion).__name__)


def _check_sizes(fusion: Fusion, **sizes: int) -> None:
    """Raise a ``ValueError`` naming the first size option of ``fusion`` that is not a positive integer."""
    defaults = inspect.signature(type(fusion).__init__).parameters
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            default = defaults[key].default if key in defaults else 1
            raise ValueError(
                f"Fusion {_label(fusion)!r} option {key!r} must be a positive integer, found {value!r}. "
                f"Pass e.g. {key}={default!r} (the default)."
            )


class _AuxHeads(Fusion):
    """Mixin state: one auxiliary linear head per modality on detached features."""

    auxiliary = True

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.aux = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def aux_logits(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.aux[m](features[m].detach()) for m in self.modalities}


@register_fusion("concat")
class ConcatFusion(Fusion):
    """Concatenate features and apply one linear layer; unimodal logits use each column block."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(dims.values()), num_classes)
        bounds, start = {}, 0
        for m, d in dims.items():
            bounds[m] = slice(start, start + d)
            start += d
        self._blocks = bounds

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        w, b = self.fc.weight, self.fc.bias
        share = b / len(self.modalities)
        uni = {m: features[m] @ w[:, self._blocks[m]].t() + share for m in self.modalities}
        fused = torch.stack(list(uni.values())).sum(0)
        return fused, uni

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        return {m: (self.fc.weight, s) for m, s in self._blocks.items()}


@register_fusion("sum")
class SumFusion(Fusion):
    """Each modality has its own linear head; fused logits are their sum."""

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.heads[m](features[m]) for m in self.modalities}
        return torch.stack(list(uni.values())).sum(0), uni

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        return {m: (h.weight, slice(0, h.weight.shape[1])) for m, h in self.heads.items()}


@register_fusion("weighted")
class WeightedFusion(SumFusion):
    """Own heads per modality, fused as ``sum_m w_m z_m`` with ``w = M * softmax(alpha)`` learnable.

    The unimodal logits are each head's own output ``z_m`` (the modality's prediction), so they do
    not sum to the fused logits unless the weights are equal.
    """

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        self.alpha = nn.Parameter(torch.zeros(len(dims)))

    def weights(self) -> Tensor:
        """Current modality weights (sum to M)."""
        return torch.softmax(self.alpha, 0) * len(self.modalities)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        uni = {m: self.heads[m](features[m]) for m in self.modalities}
        w = self.weights()
        fused = sum(w[i] * uni[m] for i, m in enumerate(self.modalities))
        return fused, uni


@register_fusion("film")
class FiLMFusion(_AuxHeads):
    """FiLM: the first modality's feature is scaled and shifted by a projection of the others.

    ``h = gamma(c) * h_1 + beta(c)`` with ``c`` the concatenation of the other modalities, then a
    linear classifier. Unimodal logits come from auxiliary heads (see module docstring).
    """

    def __init__(self, dims: dict[str, int], num_classes: int) -> None:
        super().__init__(dims, num_classes)
        first, *rest = self.modalities
        d1, dc = dims[first], sum(dims[m] for m in rest)
        self.film = nn.Linear(dc, 2 * d1)
        self.fc = nn.Linear(d1, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        first, *rest = self.modalities
        cond = torch.cat([features[m] for m in rest], 1)
        gamma, beta = self.film(cond).chunk(2, dim=1)
        fused = self.fc((1 + gamma) * features[first] + beta)
        return fused, self.aux_logits(features)


@register_fusion("gated")
class GatedFusion(_AuxHeads):
    """Gated fusion: ``h = sum_m sigmoid(g_m([h_1..h_M])) * tanh(P_m h_m)``, then a linear classifier."""

    def __init__(self, dims: dict[str, int], num_classes: int, hidden: int = 128) -> None:
        super().__init__(dims, num_classes)
        total = sum(dims.values())
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in dims.items()})
        self.gate = nn.ModuleDict({m: nn.Linear(total, hidden) for m in dims})
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        allf = torch.cat([features[m] for m in self.modalities], 1)
        h = sum(
            torch.sigmoid(self.gate[m](allf)) * torch.tanh(self.proj[m](features[m])) for m in self.modalities
        )
        return self.fc(h), self.aux_logits(features)


@register_fusion("attention")
class AttentionFusion(_AuxHeads):
    """A small transformer over one token per modality (plus a learned modality embedding), mean-pooled."""

    def __init__(
        self, dims: dict[str, int], num_classes: int, d_model: int = 64, heads: int = 4, layers: int = 1
    ) -> None:
        super().__init__(dims, num_classes)
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads}).")
        self.proj = nn.ModuleDict({m: nn.Linear(d, d_model) for m, d in dims.items()})
        self.modality_embed = nn.Parameter(torch.zeros(len(dims), d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        tokens = torch.stack([self.proj[m](features[m]) for m in self.modalities], 1) + self.modality_embed
        fused = self.fc(self.encoder(tokens).mean(1))
        return fused, self.aux_logits(features)


@register_fusion("affine")
class AffineFusion(_AuxHeads):
    """Affine modulation of a chosen ``target`` modality by an MLP of the others (AMSS's FiLM, either way).

    ``h = (1 + gamma(c)) * h_t + beta(c)`` with ``h_t`` the target modality's features and ``c`` the
    other modalities' features concatenated in modality order; ``(gamma, beta)`` come from a two-layer
    MLP conditioner (``Linear -> ReLU -> Linear``), then a linear classifier on ``h``. This is the
    feature-wise affine transformation of FiLM (Perez et al., AAAI 2018) as the AMSS paper (Yang et al.,
    TPAMI 2025) uses it, whose code modulates either modality by the other (its ``x_film`` flag).

    How it differs from ``film``: ``film`` is fixed (the first modality modulated by one linear
    projection of the rest); here ``target`` chooses the direction (any modality, for M >= 2), the
    conditioner is an MLP, and its parameters are named by direction (``conditioner.<target>.*``), so
    a checkpoint of one direction does not load silently into the other. ``direction`` reads e.g.
    ``"m1 <- m0, m2"``. Deviation from the AMSS code: ``1 + gamma`` (identity-centred, as our ``film``)
    instead of ``gamma``. It cannot be split into per-modality terms, so the unimodal logits come from
    auxiliary heads on detached features (see the module docstring).

    Args:
        dims: feature dimension of each modality, in modality order.
        num_classes: number of classes C.
        target: the modality that is modulated (default: the first).
        hidden: width of the conditioner MLP.

    Raises:
        ValueError: ``target`` is not a modality (the message lists them), or ``hidden`` is not positive.
    """

    def __init__(
        self, dims: dict[str, int], num_classes: int, target: str | None = None, hidden: int = 128
    ) -> None:
        super().__init__(dims, num_classes)
        _check_sizes(self, hidden=hidden)
        target = self.modalities[0] if target is None else target
        if target not in dims:
            raise ValueError(
                f"Fusion {_label(self)!r} option 'target' must be one of the modalities {self.modalities}, "
                f"found {target!r}. Pass target=<the modality to modulate> (default: the first)."
            )
        self.target = target
        self.sources = [m for m in self.modalities if m != target]
        d_t, d_c = dims[target], sum(dims[m] for m in self.sources)
        mlp = nn.Sequential(nn.Linear(d_c, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d_t))
        self.conditioner = nn.ModuleDict({target: mlp})
        self.fc = nn.Linear(d_t, num_classes)

    @property
    def direction(self) -> str:
        """Which modality is modulated by which, e.g. ``"m1 <- m0, m2"``."""
        return f"{self.target} <- {', '.join(self.sources)}"

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}"

    def modulation(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The scale offset ``gamma`` and shift ``beta`` predicted from the non-target modalities."""
        cond = torch.cat([features[m] for m in self.sources], 1)
        gamma, beta = self.conditioner[self.target](cond).chunk(2, dim=1)
        return gamma, beta

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        gamma, beta = self.modulation(features)
        fused = self.fc((1 + gamma) * features[self.target] + beta)
        return fused, self.aux_logits(features)


@register_fusion("channel")
class ChannelFusion(Fusion):
    """MMTM channel squeeze-excitation across modalities, then own heads averaged (Vaezi Joze et al., CVPR'20).

    MMTM ("MMTM: Multimodal Transfer Module for CNN Fusion"): squeeze each modality's features
    ``s_m``, a joint bottleneck ``z = ReLU(W_s [s_1; ...; s_M] + b_s)`` of width
    ``max(1, int(2 * sum_m d_m / ratio))`` (MMTM's ``dim_out``), one excitation ``e_m = W_m z + b_m``
    per modality, and recalibrated channels ``h'_m = 2 * sigmoid(e_m) * h_m``. Then, as in the AMSS
    code's MMTM classifier (Yang et al., TPAMI 2025), each modality has its own linear head
    ``z_m = head_m(h'_m)`` and the fused logits are their mean, ``z = (1/M) sum_m z_m``.

    The unimodal logits are exactly the terms ``z_m`` (``fused == mean(unimodal)``; not auxiliary):
    each carries gradient to its own encoder and, through the excitation, to the others.
    :meth:`modality_blocks` declares each head's weight, as ``sum`` does, for balancers that act on
    head blocks (AGM, MSLR, AMSS fusion masking).

    The encoders here return pooled vectors, so the squeeze is the identity. For encoders ending in
    global average pooling, exciting the last feature map's channels and then pooling equals exciting
    the pooled vector's channels (the gate is constant over space), so this is MMTM at the last
    stage. MMTM at intermediate stages (the paper's and the AMSS code's stages 2-4) would need hooks
    into the encoders and is not done. Deviation from the AMSS code: the MMTM paper's ``2 * sigmoid``
    gate (identity when ``e_m = 0``) rather than the code's plain ``sigmoid``.

    Args:
        dims: feature dimension (channels) of each modality, in modality order.
        num_classes: number of classes C.
        ratio: bottleneck reduction ratio (MMTM's default 4).

    Raises:
        ValueError: ``ratio`` is not a positive integer.
    """

    def __init__(self, dims: dict[str, int], num_classes: int, ratio: int = 4) -> None:
        super().__init__(dims, num_classes)
        _check_sizes(self, ratio=ratio)
        total = sum(dims.values())
        self.bottleneck = max(1, int(2 * total / ratio))
        self.squeeze = nn.Linear(total, self.bottleneck)
        self.excite = nn.ModuleDict({m: nn.Linear(self.bottleneck, d) for m, d in dims.items()})
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    def gates(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per modality, the channel gate ``2 * sigmoid(e_m)`` in ``(0, 2)``, shape ``(B, d_m)``."""
        z = torch.relu(self.squeeze(torch.cat([features[m] for m in self.modalities], 1)))
        return {m: 2 * torch.sigmoid(self.excite[m](z)) for m in self.modalities}

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        gates = self.gates(features)
        uni = {m: self.heads[m](gates[m] * features[m]) for m in self.modalities}
        return torch.stack(list(uni.values())).mean(0), uni

    def modality_blocks(self) -> dict[str, tuple[nn.Parameter, slice]]:
        return {m: (h.weight, slice(0, h.weight.shape[1])) for m, h in self.heads.items()}


@register_fusion("ml_lstm")
class MultiLayerLSTMFusion(_AuxHeads):
    """A multi-layer LSTM over one token per modality (Hochreiter & Schmidhuber 1997; AMSS's ML-LSTM).

    Each modality's features are projected to a common ``width`` (its own linear layer) and layer-normed;
    the ``M`` tokens, in modality order, go through ``layers`` stacked LSTM layers of ``hidden`` units,
    each layer after the first adding its input back (residual), and the readout goes to a linear
    classifier. Input weights are Xavier-initialised, recurrent weights orthogonal, the forget gate's
    bias starts at 1. Without the norm, the residuals and that initialisation, a plain 2-layer
    ``nn.LSTM`` sat on its initial plateau under the SGD recipes: 15.8 % on AVD-hard and 52 % on mfeat
    pix+fou after 20 / 15 epochs, against 84-88 % and 97.8 % with them (one seed each). ``readout="last"`` (default) takes the top layer's
    hidden state after the last token (the usual LSTM classifier; later modalities are nearer to it),
    ``"mean"`` averages the top layer's outputs over the tokens. It follows the multi-layer LSTM
    fusion in the AMSS paper's experiments (Yang et al., TPAMI 2025). It cannot be split into
    per-modality terms, so the unimodal logits come from auxiliary heads on detached features.

    Note: on GPU, cuDNN's LSTM backward needs train mode; a backward pass through the model in eval
    mode fails there (a forward in eval mode, as in evaluation, is fine).

    Args:
        dims: feature dimension of each modality, in modality order.
        num_classes: number of classes C.
        width: the common token width each modality is projected to.
        hidden: LSTM hidden size.
        layers: number of stacked LSTM layers.
        readout: ``"last"`` hidden state or ``"mean"`` over tokens.

    Raises:
        ValueError: a size is not a positive integer.
    """

    def __init__(
        self,
        dims: dict[str, int],
        num_classes: int,
        width: int = 64,
        hidden: int = 128,
        layers: int = 2,
        readout: Literal["last", "mean"] = "last",
    ) -> None:
        super().__init__(dims, num_classes)
        _check_sizes(self, width=width, hidden=hidden, layers=layers)
        if readout not in ("last", "mean"):
            raise ValueError(
                f"Fusion {_label(self)!r} option 'readout' must be 'last' or 'mean', found {readout!r}."
            )
        self.readout = readout
        self.proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in dims.items()})
        # tokens at unit scale, so the gates start away from their flat middle (see the class notes)
        self.norm = nn.LayerNorm(width)
        self.lstms = nn.ModuleList(
            nn.LSTM(width if i == 0 else hidden, hidden, batch_first=True) for i in range(layers)
        )
        for lstm in self.lstms:
            for name, p in lstm.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                else:  # biases: zero, the forget gate's (second quarter) +1 once
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        nn.init.ones_(p[hidden : 2 * hidden])
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features: dict[str, Tensor]) -> FusionOutput:
        out = self.norm(torch.stack([self.proj[m](features[m]) for m in self.modalities], 1))
        for i, lstm in enumerate(self.lstms):
            step, _ = lstm(out)  # (B, M, hidden)
            out = step if i == 0 else out + step  # residual from the second layer on
        h = out[:, -1] if self.readout == "last" else out.mean(1)
        return self.fc(h), self.aux_logits(features)


def list_fusions() -> list[str]:
    """Names of the registered fusion heads."""
    return FUSIONS.names()


def create_fusion(name: str, dims: dict[str, int], num_classes: int, **kwargs: Any) -> Fusion:
    """Build the fusion head registered as ``name``; unknown or mistyped options fail with the valid ones."""
    return FUSIONS.create(name, dims, num_classes, **kwargs)
