"""``MMTMClassifier``: mid fusion through MMTM gates between encoder stages (Joze et al., CVPR 2020).

A Multimodal Transfer Module (MMTM) is a squeeze-and-excitation gate across modalities: after a stage of
every encoder it squeezes each modality's activation to one value per channel (the mean over the spatial
or temporal positions), concatenates the squeezes of all modalities, maps them through one shared linear
layer and a ReLU, and gives each modality a sigmoid excitation per channel that rescales its activation::

    s_m = mean_positions(x_m)                        (B, C_m)
    z   = relu(W [s_1, ..., s_M] + b)                (B, int(2 * sum_m C_m / ratio))
    e_m = sigmoid(W_m z + b_m)                       (B, C_m)
    x_m <- x_m * e_m                                 (broadcast over the positions)

With two modalities this is the gate of the greedy-learning paper's official code
(``src/balanced_mmtm.py``, ``MMTM_mitigate`` with ``SEonly=False, shareweight=False``), whose model
(``src/model.py``, ``MMTM_MVCNN``) places one after stages 2, 3 and 4 of two ResNet-18s, gives each branch
its own linear head and predicts with the mean of the two heads' logits; so does this classifier.

Each gate can replace a modality's excitation by a given per-channel vector (:meth:`MMTMGate.set_override`);
the ``greedy`` balancer uses this for its re-balancing windows (the modality then gets no sample-wise help
from the others). A gate in training mode keeps the batch sum of its excitations of the last forward
(:attr:`MMTMGate.excitation_sums`, detached) for that balancer's running averages.

Encoders are split into stages: ``mlp`` (one stage per hidden layer), ``ConvEncoder`` (``cnn``,
``conv1d``, ...: one stage per conv block, a max-pool joining the block after it), or any encoder with a
``stages`` ``nn.ModuleList`` (and optionally a ``pool(x) -> (B, d)`` method; default: mean over the
positions). Other encoders are refused, naming these options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..types import MultimodalOutput, check_batch
from .classifier import feature_dim
from .encoders import MLP, ConvEncoder

MMTM_FUSION = "mmtm"
"""The ``model.fusion`` value that builds an :class:`MMTMClassifier` (``model.fusion_options``: its options)."""


def _pool(x: Tensor) -> Tensor:
    """Mean over every position: ``(B, C, ...) -> (B, C)`` (a ``(B, C)`` tensor is returned as it is)."""
    return x if x.dim() == 2 else x.flatten(2).mean(2)


def encoder_stages(encoder: nn.Module, name: str) -> list[nn.Module]:
    """The stages of a splittable encoder, in order (see the module docstring); ValueError otherwise."""
    if isinstance(encoder, MLP):
        net = list(encoder.net)
        return [
            nn.Sequential(nn.Flatten(1), *net[:3]),
            *(nn.Sequential(*net[i : i + 3]) for i in range(3, len(net), 3)),
        ]
    if isinstance(encoder, ConvEncoder):
        stages: list[nn.Module] = []
        pending: list[nn.Module] = []
        for block in encoder.body:
            pending.append(block)
            if not isinstance(block, (nn.MaxPool1d, nn.MaxPool2d)):
                stages.append(nn.Sequential(*pending))
                pending = []
        if pending:  # trailing pools join the last block
            stages[-1] = nn.Sequential(*stages[-1], *pending)
        return stages
    custom = getattr(encoder, "stages", None)
    if isinstance(custom, nn.ModuleList) and len(custom):
        return list(custom)
    raise ValueError(
        f"MMTM fusion needs encoders split into stages, but modality {name!r} has a "
        f"{type(encoder).__name__}, which cannot be split. Use an 'mlp' or a ConvEncoder ('cnn', 'conv1d'), "
        "or give the encoder a `stages` nn.ModuleList (and optionally a `pool(x)` method), or use a late "
        "fusion (model.fusion=concat)."
    )


class MMTMGate(nn.Module):
    """One MMTM gate over ``M`` modalities (see the module docstring).

    Args:
        channels: channels ``C_m`` per modality, in modality order.
        ratio: the squeeze width is ``int(2 * sum(C_m) / ratio)`` (official: 4).
    """

    def __init__(self, channels: Mapping[str, int], ratio: float = 4) -> None:
        super().__init__()
        total = sum(channels.values())
        width = int(2 * total / ratio)
        if width < 1:
            raise ValueError(f"MMTM ratio {ratio} leaves no squeeze unit for {total} channels; lower it.")
        self.channels = dict(channels)
        self.squeeze = nn.Linear(total, width)
        self.excite = nn.ModuleDict({m: nn.Linear(width, c) for m, c in channels.items()})
        self.override: tuple[Tensor, dict[str, Tensor]] | None = None
        self.override_in_eval = False
        self.excitation_sums: dict[str, Tensor] | None = None

    def set_override(self, mask: Tensor | None, values: Mapping[str, Tensor] | None = None) -> None:
        """Replace modality ``m``'s excitation by ``values[m]`` (``(C_m,)``) wherever ``mask[m]`` (a device
        bool vector in modality order) is true; ``None`` restores the gate. In eval mode only when
        :attr:`override_in_eval`."""
        self.override = None if mask is None or values is None else (mask, dict(values))

    def forward(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        squeezed = torch.cat([_pool(xs[m]) for m in self.channels], dim=1)
        z = torch.relu(self.squeeze(squeezed))
        gates = {m: torch.sigmoid(self.excite[m](z)) for m in self.channels}
        if self.training:
            self.excitation_sums = {m: g.detach().sum(0) for m, g in gates.items()}
        if self.override is not None and (self.training or self.override_in_eval):
            mask, values = self.override
            for i, m in enumerate(self.channels):
                gates[m] = torch.where(mask[i], values[m].to(gates[m]).expand_as(gates[m]), gates[m])
        out = {}
        for m, x in xs.items():
            g = gates[m]
            out[m] = x * g.view(g.shape + (1,) * (x.dim() - 2))
        return out


class MMTMClassifier(nn.Module):
    """Encoders split into stages with MMTM gates between them, a linear head per modality, and the mean of
    the heads' logits as the fused prediction (the official ``MMTM_MVCNN``'s ``(x_0 + x_1) / 2``).

    Args:
        encoders: modality name -> splittable encoder (see :func:`encoder_stages`); order = modality order.
        num_classes: number of classes.
        gates: stage numbers (1-based) after which a gate sits, the same for every encoder; ``None``: after
            every stage but the first (the official code gates ResNet-18 stages 2-4 of 4), or after the only
            stage of a one-stage encoder.
        ratio: squeeze ratio of every gate (official 4).
        validate_inputs: check each batch for missing modalities and non-finite values.
    """

    auxiliary_heads = False

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        num_classes: int,
        gates: Sequence[int] | None = None,
        ratio: float = 4,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(
                f"MMTMClassifier needs at least 2 encoders, found {len(encoders)} ({list(encoders)})."
            )
        self.encoders = nn.ModuleDict(dict(encoders))
        stages = {m: encoder_stages(e, m) for m, e in self.encoders.items()}
        counts = {m: len(s) for m, s in stages.items()}
        if gates is None:
            if len(set(counts.values())) > 1:
                raise ValueError(
                    f"The encoders have different numbers of stages {counts}; pass gates=[stage numbers] "
                    "that every encoder has."
                )
            n = next(iter(counts.values()))
            gates = list(range(2, n + 1)) if n > 1 else [1]
        gates = sorted({int(g) for g in gates})
        low = min(counts.values())
        if not gates or gates[0] < 1 or gates[-1] > low:
            raise ValueError(
                f"gates must be stage numbers in 1..{low} (stages per encoder: {counts}), found {gates}."
            )
        self.gate_after = gates
        self.num_classes = int(num_classes)
        self.validate_inputs = validate_inputs
        channels = self._stage_channels(stages)
        self.gates = nn.ModuleList(MMTMGate({m: channels[m][g - 1] for m in stages}, ratio) for g in gates)
        dims = {m: feature_dim(e, m) for m, e in self.encoders.items()}
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in dims.items()})

    @property
    def modalities(self) -> list[str]:
        """Modality names in order."""
        return list(self.encoders.keys())

    def _stage_channels(self, stages: Mapping[str, list[nn.Module]]) -> dict[str, list[int]]:
        """Output channels of every stage (the out_features/out_channels of its last Linear or conv)."""
        out: dict[str, list[int]] = {}
        for m, parts in stages.items():
            out[m] = []
            for stage in parts:
                layers = [
                    x for x in stage.modules() if isinstance(x, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                ]
                if not layers:
                    raise ValueError(
                        f"A stage of modality {m!r} holds no Linear or conv layer to size an MMTM gate."
                    )
                last = layers[-1]
                out[m].append(last.out_features if isinstance(last, nn.Linear) else last.out_channels)
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> MultimodalOutput:
        if self.validate_inputs:
            check_batch(batch, self.modalities)
        stages = {m: encoder_stages(e, m) for m, e in self.encoders.items()}
        xs = {m: batch[m] for m in self.modalities}
        gates = dict(zip(self.gate_after, self.gates, strict=True))
        for k in range(max(len(s) for s in stages.values())):
            xs = {m: stages[m][k](x) if k < len(stages[m]) else x for m, x in xs.items()}
            if k + 1 in gates:
                xs = gates[k + 1](xs)
        features = {m: getattr(self.encoders[m], "pool", _pool)(x) for m, x in xs.items()}
        uni = {m: self.heads[m](h) for m, h in features.items()}
        fused = torch.stack(list(uni.values())).mean(0)
        return MultimodalOutput(fused, uni, features)
