"""Own-signal training: every encoder keeps a loss of its own while the fused loss trains the model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import UnimodalHeads
from .registry import register_balancer


@register_balancer("own_signal")
class OwnSignal(Balancer):
    """Own-signal training (equimodal, 2026): the fused CE plus each modality's CE through a head of its own.

    Diagnosis behind it (``docs/diagnose.md``): in joint training the modality that fits the training data
    first drives the fused loss down, and the fused loss then stops teaching the other encoders, even the
    one that is stronger alone (on AVD-hard the image encoder's probe stays 11 pp below the image branch
    trained alone). Confidence-based balancers (OGM-GE, AMSS) call that stronger encoder dominant and
    slow it further. Here each encoder also learns from a loss of its own that does not vanish when the
    other modality fits the data:

    ``L = CE(fused, y) + sum_m w_m CE(head_m(z_m), y)``

    with ``head_m`` a linear head of the balancer's own on modality m's features (not detached; it is
    only used for this loss and for the reported per-modality accuracy) and ``w_m = weight`` (2 by
    default, chosen on validation accuracy over six tasks: the best mean with no task below joint
    training; the evidence is in ``docs/diagnose.md``). Two options go further and are off by default:
    ``adapt="starved"`` multiplies each ``w_m`` by ``(CE_m / CE_fused)^power`` (detached, capped at
    ``max_weight``): the more the fused loss has fallen below what modality m's own head still misses,
    the more its own loss counts. It gained 6 pp on AVD-hard but, where the fused training loss
    approaches zero (mfeat), the weights sit at the cap and training diverged; use it only where joint
    training stays far from fitting the training set, and check it on validation data. ``normalize`` in
    ``[0, 1]`` equalises the encoders' gradient norms towards their mean (per optimizer step,
    ``g_m *= (mean_k n_k / n_m)^normalize`` with ``n`` the running norms, each factor clamped to
    ``[1 / max_scale, max_scale]``): per-modality adaptive step sizes for SGD.

    Args:
        model: a contract model whose output carries ``features`` (pooled, not detached).
        weight: the unimodal losses' weight ``w`` (the base weight with ``adapt="starved"``).
        adapt: ``"none"`` (fixed weights) or ``"starved"`` (weights grow as the fused loss starves them).
        power: exponent of the ``"starved"`` factor.
        max_weight: cap of the ``"starved"`` factor.
        normalize: strength of the per-encoder gradient-norm equalisation (0: off).
        momentum: EMA momentum of the running gradient norms.
        max_scale: the equalisation's factors are clamped to ``[1 / max_scale, max_scale]``.
        feature_dims, num_classes: sizes for the heads, for models that declare neither.
        start_epoch, end_epoch: the method's window; seed: the heads' initialisation.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float = 2.0,
        adapt: Literal["none", "starved"] = "none",
        power: float = 1.0,
        max_weight: float = 5.0,
        normalize: float = 0.0,
        momentum: float = 0.9,
        max_scale: float = 4.0,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        for key, value, low in (
            ("weight", weight, 0.0),
            ("power", power, 0.0),
            ("max_weight", max_weight, 1.0),
            ("max_scale", max_scale, 1.0),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ValueError(
                    f"Balancer 'own_signal' option {key!r} must be a finite number >= {low:g}, found {value!r}."
                )
        if adapt not in ("none", "starved"):
            raise ValueError(
                f"Balancer 'own_signal' option 'adapt' must be 'none' or 'starved', found {adapt!r}."
            )
        if not 0.0 <= normalize <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"Balancer 'own_signal' options 'normalize' must lie in [0, 1] and 'momentum' in [0, 1), "
                f"found {normalize!r}, {momentum!r}."
            )
        self.weight, self.adapt, self.power, self.max_weight = (
            float(weight),
            adapt,
            float(power),
            float(max_weight),
        )
        self.normalize, self.momentum, self.max_scale = float(normalize), float(momentum), float(max_scale)
        self.heads = UnimodalHeads(
            model,
            self.modalities,
            feature_dims=feature_dims,
            num_classes=num_classes,
            seed=seed,
            method=self.name,
        )
        self._norms: Tensor | None = None  # running encoder gradient norms (normalize > 0)
        self._last: dict[str, Tensor] = {}

    def parameters(self) -> Iterator[nn.Parameter]:
        """The unimodal heads' parameters (put them in the optimizer)."""
        return self.heads.parameters()

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The fused CE plus the weighted unimodal CEs of the balancer's own heads."""
        fused = F.cross_entropy(out.logits, target)
        uni = torch.stack([F.cross_entropy(self.heads.logit(out, m), target) for m in self.modalities])
        w = torch.full_like(uni, self.weight)
        if self.adapt == "starved":
            ratio = (uni.detach() / fused.detach().clamp_min(1e-6)).pow(self.power)
            w = w * ratio.clamp(max=self.max_weight)
        self._last = {"weights": w.detach(), "uni": uni.detach(), "fused": fused.detach()}
        return fused + (w * uni).sum()

    def adjust_gradients(self) -> None:
        """Average the heads' gradients over ranks, check the optimizer holds them, equalise the encoders."""
        self.heads.all_reduce_grads()
        self.heads.check_stepped(self.model)
        if self.normalize <= 0:
            return
        grads = {m: [p.grad for p in self.encoder_params(m) if p.grad is not None] for m in self.modalities}
        if not all(grads.values()):
            return
        norms = torch.stack([torch.stack(torch._foreach_norm(g)).norm() for g in grads.values()]).float()
        # on the device, no host sync: an overflow step (left to the GradScaler) keeps the running norms
        finite = torch.isfinite(norms).all()
        previous = torch.ones_like(norms) if self._norms is None else self._norms
        updated = norms if self._norms is None else self.momentum * previous + (1 - self.momentum) * norms
        self._norms = torch.where(finite, updated, previous)
        scale = (self._norms.mean() / self._norms.clamp_min(1e-12)).pow(self.normalize)
        # bounded: unbounded, a diverging encoder raises the mean norm and so every other encoder's scale
        # (on mfeat fac+mor at weight 2, starved, normalize 0.5 the scales reached 10^2 and the loss inf)
        scale = scale.clamp(1.0 / self.max_scale, self.max_scale)
        for i, m in enumerate(self.modalities):
            torch._foreach_mul_(grads[m], scale[i].to(grads[m][0].dtype))
        self._last["scale"] = scale

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's own head (the reported per-modality accuracy while active)."""
        return self.heads.logits(out)

    def stats(self) -> dict[str, float]:
        """``w/<m>`` (the unimodal weights), ``uni_loss/<m>``, ``fused_loss`` and ``scale/<m>`` (one sync)."""
        if not self._last or not self.active:
            return {}
        keys = [k for k in ("weights", "uni", "scale") if k in self._last]
        values = torch.cat(
            [self._last[k].float().reshape(-1) for k in keys] + [self._last["fused"].reshape(1)]
        )
        flat = values.tolist()
        names = {"weights": "w", "uni": "uni_loss", "scale": "scale"}
        out: dict[str, Any] = {}
        for i, k in enumerate(keys):
            for j, m in enumerate(self.modalities):
                out[f"{names[k]}/{m}"] = flat[i * len(self.modalities) + j]
        out["fused_loss"] = flat[-1]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Epoch, steps, the heads and the running gradient norms."""
        state = super().state_dict()
        state.update(heads=self.heads.state_dict(), norms=None if self._norms is None else self._norms.cpu())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the heads in place)."""
        super().load_state_dict(state)
        self.heads.load_state_dict(state["heads"])
        norms = state.get("norms")
        self._norms = None if norms is None else norms.to(next(self.heads.parameters()).device)
