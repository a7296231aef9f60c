"""AMSS, AMSS+ and uniform masking (Yang et al., "Learning to Rebalance Multi-Modal Optimization by
Adaptively Masking Subnetworks", TPAMI 2025) as balancers.

Per optimizer step: ``loss()`` accumulates each micro-batch's significance statistics (CE of the
unimodal logits, feature entropies, label histogram; a declared statistic, which the base class
all-reduces under DDP); ``before_step()`` turns them into update ratios ``k_m`` (the dominant modality
keeps fewer units), then scores, samples and masks every unit tensor's gradient in place in one
vectorised pass (:mod:`equimodal.amss`), with no host read. The forward pass and the optimizer are
untouched: masked units still move by momentum and weight decay, as in the official code (spec B9).
Options are four parts (:mod:`equimodal.amss.parts`) or their flat names; defaults, presets and every
deviation from the official code: ``docs/amss.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..amss.masker import MASK_STATS, GradientMasker
from ..amss.parts import (
    AMSSParts,
    Preset,
    RatioRule,
    Sampler,
    Significance,
    SignificanceKind,
    options_signature,
    resolve_parts,
)
from ..amss.ratios import fixed_ratios, update_ratios
from ..amss.sampling import ReweightMode, SamplerName
from ..amss.significance import batch_sums, significance_from_sums
from ..amss.units import UnitSelection, discover_units
from ..registry import option_parameters
from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import UnimodalHeads
from .registry import register_balancer

log = logging.getLogger(__name__)

_BASE_OPTIONS = tuple(option_parameters(Balancer, skip=1))  # start_epoch, end_epoch, seed


@register_balancer("amss")
class AMSS(Balancer):
    """AMSS (Yang et al., TPAMI 2025): keep a significance-dependent fraction of each modality's gradient units.

    Its options are four parts (:mod:`equimodal.amss.parts`), each a frozen object that checks itself::

        AMSS(model, ratio=RatioRule(temperature=0.5), sampler=Sampler("topk"),
             units=UnitSelection(conv_units="input_channels"))

    Args:
        model: a model following the contract; its encoders' units (and fusion-head blocks) are masked.
        ratio: how the update ratios follow from the significance (:class:`~equimodal.amss.parts.RatioRule`),
            or a fixed update ratio ``k`` in (0, 1] (``RatioRule(fixed=k)``); ``None``: the defaults.
        significance: how the significance is measured (:class:`~equimodal.amss.parts.Significance`), or
            its kind, ``"confidence"`` (default) or ``"speed"``. With own heads (``head_weight > 0`` or
            ``"speed"``) put ``balancer.parameters()`` in the optimizer (the reference trainer does).
        sampler: how units are scored, sampled and reweighted (:class:`~equimodal.amss.parts.Sampler`), or
            a sampler name; ``None``: the class default (``"uniform"`` for ``uniform_mask``, else
            ``"adaptive"``; reweighting ``"inverse_inclusion"`` with a score floor of 0.1 for
            ``amss_plus``, else none).
        units: which units are masked (:class:`~equimodal.amss.units.UnitSelection`); ``None``: the defaults.
        preset: ``"official_code"``, ``"official_av"``, ``"official_it"`` or ``"official_nv"``: switch on
            what only reproduces the official code, or one official script
            (:data:`~equimodal.amss.parts.PRESETS`, ``docs/amss.md``); a flat option overrides a switch.
        start_epoch: first epoch in which the method acts.
        end_epoch: last epoch in which it acts (``None``: no end).
        seed: seed of the sampling generator (identical on every DDP rank).
        **options: flat options, each a field of one part (:data:`~equimodal.amss.parts.FLAT_OPTIONS`:
            ``temperature=0.5`` is ``ratio=RatioRule(temperature=0.5)``), as a config passes them
            (``--set balancer.options.temperature=0.5``); a flat option together with its part is an
            error. ``inspect.signature(AMSS)`` lists them with their types and defaults.

    Statistics (``stats()``, recorded on the device every step, ``{}`` outside the window): per modality
    ``m``: ``rho/m``, ``mi/m`` (the bound ``I_m``), ``k/m`` (update ratio used: the fixed ratio when
    one is set), ``kept_fraction/m`` (kept units / units), ``kept_grad_norm/m`` (norm of the kept part of
    the gradient / full norm, before reweighting), ``mean_weight/m`` (mean weight of kept units: 1 for
    AMSS) and ``grad_norm_ratio/m`` (norm of the masked, reweighted gradient / full norm); plus
    ``label_entropy``, ``fallback`` (1 if the fallback fired) and ``nonfinite`` (1 if the step was left
    unmasked for inf/NaN gradients; averaged over an epoch, these two are rates); per masked tensor
    ``layer_kept/<modality>/<name>``, the fraction of its units kept; with own heads ``uni_loss/m``.

    Attributes:
        parts: the four parts in use (:class:`~equimodal.amss.parts.AMSSParts`), class defaults filled in.
        units: what is masked (public API): modality -> list of :class:`~equimodal.amss.units.UnitTensor`,
            one per masked parameter, with its ``modality``, ``name`` (qualified module name), ``kind`` (``"filters"``,
            ``"rows"``, ``"head_rows"``, ``"head_cols"``, ``"gate_rows"``, ``"row_elements"``, ``"input_channels"``,
            ``"filter_elements"``), ``groups`` and ``units``.
    """

    default_sampler: ClassVar[SamplerName] = "adaptive"
    default_reweight: ClassVar[ReweightMode] = "none"
    default_score_floor: ClassVar[float] = 0.0

    def __init__(
        self,
        model: nn.Module,
        *,
        ratio: RatioRule | float | None = None,
        significance: Significance | SignificanceKind = "confidence",
        sampler: Sampler | SamplerName | None = None,
        units: UnitSelection | None = None,
        preset: Preset | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        given = dict(ratio=ratio, significance=significance, sampler=sampler, units=units, preset=preset)
        self.parts = self.parts_from({**options, **given})
        self._fallback_ratio = torch.tensor(self.parts.ratio.fallback_ratios(self.modalities))
        self.own_heads = self._own_heads(model, seed)
        if self.parts.sampler.reweight == "code":
            log.warning(
                "AMSS+: reweight='code' reproduces the official weights 1/(q + 1/N + b), which are not unbiased and "
                "amplify gradients ~N/2 times when b = 0 (they diverged in our SGD runs, see docs/amss.md); prefer the default."
            )
        self.units = discover_units(model, self.modalities, self.parts.units)
        self.masker = self._masker()
        self._warned_no_loss = False
        self._declare_state()
        self._layer_keys = [f"{u.modality}/{u.name}" for u in self.masker.tensors]

    @classmethod
    def parts_from(cls, options: Mapping[str, Any]) -> AMSSParts:
        """The parts this balancer builds from its keyword options, class defaults filled in.

        Args:
            options: part objects, flat options and ``preset``, as the constructor takes them (the base
                class's ``start_epoch``, ``end_epoch`` and ``seed`` are ignored).

        Raises:
            TypeError / ValueError: as the constructor (see :func:`~equimodal.amss.parts.resolve_parts`).
        """
        given = {k: v for k, v in options.items() if k not in _BASE_OPTIONS and k != "preset"}
        parts = resolve_parts(
            given, preset=options.get("preset"), reweights=cls.default_reweight != "none",
            where=f"Balancer {cls.name!r}",
        )  # fmt: skip
        sampler = parts.sampler.resolved(cls.default_sampler, cls.default_reweight, cls.default_score_floor)
        return replace(parts, sampler=sampler)

    def _masker(self) -> GradientMasker:
        """The gradient masker of :attr:`units`, as the sampler part says."""
        s = self.parts.sampler
        return GradientMasker(
            self.units, score=s.score, sampler=s.name, rounding=s.rounding, reweight=s.reweight,
            inclusion=s.inclusion, max_weight=s.max_weight, code_bias=s.code_bias,
            code_block_norm=s.code_block_norm, score_floor=s.score_floor,
        )  # fmt: skip

    def _declare_state(self) -> None:
        """AMSS's statistics of a step and its state across steps (:meth:`~equimodal.Balancer.add_stat`)."""
        num_m = len(self.modalities)
        self.add_stat("sig_sums")  # [n, CE sums (M), feature-entropy sums (M), label counts (C)]
        self.add_stat("uni_loss_sum", reduce="mean")  # the own heads' CEs summed over the micro-batches
        self.add_state("rho_ema", torch.full((num_m,), math.nan))  # EMA of rho (NaN: none yet)
        self.add_state("loss_ema", torch.full((2, num_m), math.nan))  # fast, slow EMAs of the heads' CEs
        # fallback steps, non-finite steps, active steps: they count non-finite steps, so never rolled back
        self.add_state("step_counts", torch.zeros(3), rollback=False)
        if self.own_heads is not None:
            self.add_state("own_heads", self.own_heads)

    def _own_heads(self, model: nn.Module, seed: int) -> UnimodalHeads | None:
        """Unimodal heads of AMSS's own: for ``head_weight > 0`` (a unimodal loss per encoder) and for
        ``significance="speed"`` (the heads' learning speed is the significance); else ``None``."""
        sig = self.parts.significance
        if not sig.own_heads:
            return None
        return UnimodalHeads(
            model, self.modalities, feature_dims=sig.feature_dims, num_classes=sig.num_classes, seed=seed,
            method=self.name,
        )  # fmt: skip

    def parameters(self) -> Iterator[nn.Parameter]:
        """The own unimodal heads' parameters (with ``head_weight > 0`` or ``significance="speed"``)."""
        return self.own_heads.parameters() if self.own_heads is not None else iter(())

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The fused CE, plus the own heads' CEs: weighted by ``head_weight`` on the encoders' features, or
        (``head_weight=0``, ``significance="speed"``) on detached features, so that they train the heads only."""
        fused = F.cross_entropy(out.logits, target)
        if self.own_heads is None:
            return fused
        head_weight = self.parts.significance.head_weight
        source = (
            out
            if head_weight > 0 or out.features is None
            else out._replace(features={m: z.detach() for m, z in out.features.items()})
        )
        uni = torch.stack([F.cross_entropy(self.own_heads.logit(source, m), target) for m in self.modalities])
        self.accumulate("uni_loss_sum", uni)
        return fused + (head_weight or 1.0) * uni.sum()

    def _speed(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """``significance="speed"``: per modality, how fast its own head's loss (``loss``, this step's) is
        falling, relative (slow EMA - fast EMA) / slow EMA, normalised by the modalities' total; and whether
        it is ready."""
        loss = loss.float()
        ema = torch.where(torch.isnan(self.loss_ema), loss, self.loss_ema)  # the first step starts both EMAs
        ema = torch.stack([0.9 * ema[0] + 0.1 * loss, 0.99 * ema[1] + 0.01 * loss])
        self.loss_ema = ema
        speed = (ema[1] - ema[0]) / ema[1].clamp_min(1e-8)
        rho = speed / speed.abs().sum().clamp_min(1e-8)
        ready = torch.full((), self.num_steps > 20, dtype=torch.bool, device=loss.device)
        return rho, ready

    # ------------------------------------------------------------------ the two calls
    def observe(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> None:
        """Add this micro-batch's significance statistics (``batch`` unused)."""
        stats = batch_sums(
            out.unimodal_logits,
            target,
            out.features,
            self.modalities,
            need_features=self.parts.significance.feature_entropy != "none",
        )
        self.accumulate("sig_sums", stats)

    def adjust_gradients(self) -> None:
        """Compute the ratios from the accumulated statistics, then sample and mask the gradients in place."""
        device = self.masker.device
        sig = self._significance(device)
        if self.parts.significance.kind == "speed" and self.uni_loss_sum is not None:
            sig["rho"], ready = self._speed(self.uni_loss_sum)
            sig["fallback"] = ~ready
        k = self._ratios(sig, device)
        mask_stats, finite = self.masker.apply(k, self.generator(device))
        flags = torch.stack([sig["fallback"].float(), (~finite).float()])
        self.step_counts = self.step_counts + torch.cat([flags, flags.new_ones(1)])
        for name in ("rho", "mi", "k"):
            self.record(name, sig[name] if name != "k" else k)
        for name, row in zip(MASK_STATS, mask_stats, strict=True):
            self.record(name, row)
        self.record("label_entropy", sig["label_entropy"])
        self.record("fallback", flags[0])
        self.record("nonfinite", flags[1])
        self.record("layer_kept", self.masker.kept_fraction_per_tensor(), keys=self._layer_keys)
        if self.own_heads is not None:
            loss = self.uni_loss_sum
            self.record(
                "uni_loss", loss if loss is not None else torch.full((len(self.modalities),), math.nan)
            )

    def _significance(self, device: torch.device) -> dict[str, Tensor]:
        """The significance of this step's accumulated statistics (fallback values when there are none)."""
        if self.sig_sums is not None:
            sig = self.parts.significance
            return significance_from_sums(
                self.sig_sums, len(self.modalities), label_entropy_mode=sig.label_entropy,
                feature_entropy_mode=sig.feature_entropy, offset=sig.offset, fallback_offset=sig.fallback_offset,
            )  # fmt: skip
        if not self._warned_no_loss:
            log.warning(
                "AMSS: before_step() without a loss() call since the last step; using fallback ratios."
            )
            self._warned_no_loss = True
        num_m = len(self.modalities)
        return {
            "rho": torch.zeros(num_m, device=device), "mi": torch.zeros(num_m, device=device),
            "label_entropy": torch.zeros((), device=device),
            "fallback": torch.ones((), dtype=torch.bool, device=device),
        }  # fmt: skip

    def _ratios(self, sig: dict[str, Tensor], device: torch.device) -> Tensor:
        """The update ratios ``k_m`` from the significance (its EMA with ``rho_momentum``; ``ratio`` if fixed)."""
        rule, rho = self.parts.ratio, sig["rho"]
        self._fallback_ratio = self._fallback_ratio.to(device)  # moved once, kept on the device
        if rule.momentum > 0:  # a NaN average (none yet) takes this step's rho
            ema = rule.momentum * self.rho_ema + (1 - rule.momentum) * rho
            self.rho_ema = rho = torch.where(torch.isfinite(ema), ema, rho)
        k = update_ratios(
            rho, rule.temperature, form=rule.form, bias=rule.bias, k_min=rule.k_min, k_max=rule.k_max,
            fallback=sig["fallback"], fallback_ratio=self._fallback_ratio, stable=rule.stable_softmax,
        )  # fmt: skip
        return fixed_ratios(rule.fixed, k) if rule.fixed is not None else k

    # ------------------------------------------------------------------ observability
    def counters(self) -> dict[str, int]:
        """Cumulative ``fallback_steps``, ``nonfinite_steps`` and ``active_steps`` (one host sync)."""
        names = ("fallback_steps", "nonfinite_steps", "active_steps")
        return {n: int(v) for n, v in zip(names, self.step_counts.tolist(), strict=True)}


@register_balancer("amss_plus")
class AMSSPlus(AMSS):
    """AMSS+ (Yang et al., TPAMI 2025): AMSS with kept units reweighted by their inverse inclusion probability.

    Default: the adaptive sampler's exact threshold-conditional inclusion probability over the unit
    scores, weights capped at ``max_weight=10``, chosen on validation accuracy across four tasks
    (docs/results.md). The cap biases the estimate where units are rarely kept (about 12 % of the
    expected gradient lost at the ratio floor ``k = 0.1``), and halves its mean squared error there.
    ``score_floor=0.1, max_weight=100`` (a defensive floor: 10 % of the group's mean score added to every
    unit's) keeps the expected masked gradient within 2 % of the true gradient at every update ratio
    (Monte-Carlo, ``tests/amss/test_amss_reweight.py``) at the price of that variance; the two tied on
    validation (``docs/amss.md``). The official code's weights ``1 / (q + 1/N + b)`` (``reweight="code"``)
    are neither unbiased nor stable.
    """

    default_reweight: ClassVar[ReweightMode] = "inverse_inclusion"
    default_score_floor: ClassVar[float] = 0.0  # the unbiased setting: score_floor=0.1, max_weight=100


@register_balancer("uniform_mask")
class UniformMask(AMSS):
    """Uniform subnetwork masking, the uniform-sampling ablation of AMSS (Yang et al., TPAMI 2025).

    Same ratios ``k_m`` as AMSS, but the kept units of each tensor are drawn uniformly (the code's
    ``random`` sample mode) and not reweighted.
    """

    default_sampler: ClassVar[SamplerName] = "uniform"


AMSS.__init__.__signature__ = options_signature(AMSS.__init__)  # type: ignore[attr-defined]
