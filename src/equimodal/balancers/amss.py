"""AMSS, AMSS+ and uniform masking (Yang et al., "Learning to Rebalance Multi-Modal Optimization by
Adaptively Masking Subnetworks", TPAMI 2025) as balancers.

Per optimizer step: ``loss()`` accumulates each micro-batch's significance statistics (CE of the
unimodal logits, feature entropies, label histogram; a declared statistic, which the base class
all-reduces under DDP); ``before_step()`` turns them into update ratios ``k_m`` (the dominant modality
keeps fewer units), then scores, samples and masks every unit tensor's gradient in place in one
vectorised pass (:mod:`equimodal.amss`), with no host read. The forward pass and the optimizer are
untouched: masked units still move by momentum and weight decay, as in the official code (spec B9).
Options, defaults and every deviation from the official code: ``docs/amss.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..amss.masker import MASK_STATS, GradientMasker
from ..amss.ratios import RatioForm, check_fixed_ratio, check_ratio_options, fixed_ratios, update_ratios
from ..amss.sampling import (
    INCLUSION_MODES,
    REWEIGHT_MODES,
    ROUNDINGS,
    SAMPLERS,
    SCORE_MODES,
    InclusionMode,
    ReweightMode,
    Rounding,
    SamplerName,
    ScoreMode,
)
from ..amss.significance import (
    FEATURE_ENTROPY_MODES,
    LABEL_ENTROPY_MODES,
    FeatureEntropyMode,
    LabelEntropyMode,
    batch_sums,
    significance_from_sums,
)
from ..amss.units import (
    ConvUnits,
    LayerKinds,
    LinearRows,
    MaskFusion,
    ModuleSelector,
    check_conv_units,
    check_layer_kinds,
    discover_units,
)
from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import UnimodalHeads
from .registry import register_balancer

log = logging.getLogger(__name__)

_CHOICES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "label_entropy": LABEL_ENTROPY_MODES,
        "feature_entropy": FEATURE_ENTROPY_MODES,
        "score": SCORE_MODES,
        "sampler": SAMPLERS,
        "rounding": ROUNDINGS,
        "reweight": REWEIGHT_MODES,
        "inclusion": INCLUSION_MODES,
    }
)


def _check_options(
    given: Mapping[str, Any],
    modalities: Sequence[str],
    fallback_ratio: float | Mapping[str, float],
    *,
    temperature: float,
    k_min: float,
    k_max: float,
    ratio_form: RatioForm,
    conv_units: ConvUnits,
    layer_kinds: LayerKinds,
    rho_momentum: float,
    max_weight: float | None,
    code_bias: float,
) -> Mapping[str, float]:
    """Check AMSS's options (each error names what was expected); returns the fallback ratio per modality."""
    for key, value in given.items():
        if value not in _CHOICES[key]:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, _CHOICES[key]))}, found {value!r}.")
    fb = fallback_ratio if isinstance(fallback_ratio, Mapping) else dict.fromkeys(modalities, fallback_ratio)
    if set(fb) != set(modalities):
        raise ValueError(
            f"fallback_ratio must map every modality {list(modalities)}, found keys {sorted(fb)}."
        )
    for value in fb.values():
        check_ratio_options(temperature, k_min, k_max, float(value), ratio_form)
    check_conv_units(conv_units)
    check_layer_kinds(layer_kinds)
    if not 0.0 <= rho_momentum < 1.0:
        raise ValueError(f"rho_momentum must lie in [0, 1), found {rho_momentum!r} (0 disables the EMA).")
    if max_weight is not None and not max_weight >= 1.0:
        raise ValueError(
            f"max_weight must be >= 1 or None (no cap), found {max_weight!r}; 100 is the default."
        )
    if code_bias < 0:
        raise ValueError(f"code_bias must be >= 0, found {code_bias!r} (0 audio-visual, 0.2 text-image).")
    return fb


@register_balancer("amss")
class AMSS(Balancer):
    """AMSS (Yang et al., TPAMI 2025): keep a significance-dependent fraction of each modality's gradient units.

    Args:
        model: a model following the contract; its encoders' units (and fusion-head blocks) are masked.
        temperature: softmax temperature ``T`` of the ratios (0.2 audio-visual / three-modality, 0.5 text-image).
        ratio_form: ``"one_minus_softmax"`` (default), ``"softmax_neg"`` or ``"softmax_own"`` (bug B1).
        ratio_bias: ``beta`` added to the ratios before clamping.
        k_min: lower bound of the ratios, in (0, 1].
        k_max: upper bound of the ratios, in (0, 1].
        ratio: a fixed update ratio ``k`` in (0, 1] used for every modality at every step instead of the
            significance-based ratios (the paper's fixed-ratio ablation, ``k`` in {0.1, 0.3, 0.5, 0.7,
            0.9}); ``None`` (default): adaptive ratios. ``temperature``, ``ratio_form``, ``ratio_bias``,
            ``k_min``/``k_max`` and ``fallback_ratio`` then do not act; the significance is still computed
            and logged (``rho/m``, ``mi/m``, ``fallback``) and ``k/m`` reports ``ratio``. Works with every
            sampler (``adaptive``, ``uniform`` and ``topk`` keep ``ceil(ratio * N)`` units per group;
            ``poisson`` keeps that many on average; ``bernoulli`` ignores ratios).
        label_entropy: ``"exact"`` (nats, default), ``"exact_bits"`` or ``"av_code"`` (the AV quirk).
        feature_entropy: ``"mean"`` (default), ``"nv_code"`` or ``"none"``.
        offset: offset ``c`` of ``rho_m = (I_m + c) / H_m``.
        fallback_offset: threshold offset of the fallback test ``any(I_m + offset' <= 0)``; ``None``: ``offset``.
        fallback_ratio: ratio used when the fallback fires or a ratio is not finite (a float or a
            per-modality mapping).
        rho_momentum: EMA momentum of ``rho`` (0: per step, as in the code).
        stable_softmax: stable softmax (default) or the code's raw ``exp``.
        score: unit score ``"gn"`` (default), ``"gn_wn"`` or ``"sqrt_gn"``.
        sampler: ``"adaptive"``, ``"topk"``, ``"uniform"``, ``"bernoulli"`` or ``"poisson"``;
            ``None``: the class default (``"uniform"`` for ``uniform_mask``, else ``"adaptive"``).
        rounding: ``"ceil"`` (default) or ``"floor"`` for the kept count.
        reweight: ``"none"``, ``"inverse_inclusion"`` or ``"code"`` (official, unstable); ``None``: the
            class default (``"inverse_inclusion"`` for ``amss_plus``, else ``"none"``).
        inclusion: the adaptive sampler's inclusion probability, ``"conditional"`` (exact) or ``"first_order"``.
        max_weight: cap of the inverse-inclusion weights (``None``: uncapped). Default 100: with the score
            floor it rarely binds (see ``score_floor``).
        score_floor: defensive floor added to every unit's score, as a fraction of its group's mean score
            (:func:`~equimodal.amss.sampling.floored_scores`); ``None``: the class default, 0.1 for
            ``amss_plus`` (with inverse-inclusion weights), else 0. It bounds the inclusion probabilities
            from below, so the inverse-inclusion weights stay bounded and the expected masked gradient
            stays within 2 % of the true gradient at every ratio 0.1-0.9 (the former cap of 10 without a
            floor lost 10-20 % at ``k = 0.1``; ``tests/amss/test_amss_reweight.py``).
        code_bias: ``b`` of the official weight ``1 / (q + 1/N + b)``.
        code_block_norm: normalise the official weight's ``q`` over a whole fusion block (text-image code).
        mask_encoders: mask the encoders' units (``False`` reproduces the three-modality code, bug B3).
        mask_fusion: the fusion head's blocks: ``True``/``"concat"`` (default) the column blocks of a head
            the modalities share, as the official text-image code (concat); ``"all"`` also the
            per-modality heads of sum/weighted/channel fusion; ``False`` none (the AV code, bug B2).
        linear_rows: plain ``Linear`` output rows: ``True`` (default: every Linear of an encoder, wherever
            it sits), ``False`` (none) or ``"auto"`` (the official rule: only in encoders without convs).
        conv_units: the unit of a conv weight: ``"filters"`` (default, the official code: an output filter
            ``W[o]``), ``"input_channels"`` (every weight reading one input channel, ``W[:, c]``; in a
            grouped conv only the filters of the channel's group read it), or ``"weights"`` (every single
            weight is a unit, scored by its squared gradient; one sampling group per output filter, so
            ``ceil(k n)`` of each filter's ``n = in/groups * prod(kernel)`` weights are kept).
        layer_kinds: the kinds of layers whose units are masked, any of ``"conv"``, ``"attention"`` (q/k/v
            and output projections of any attention), ``"linear"`` (every other Linear's rows: FFN
            neurons, MLPs, projections) and ``"rnn"``, as a collection or a comma-separated string;
            ``None`` (default): all. Units of other kinds are left unmasked (``describe_units`` says so).
            Applies on top of ``include``/``exclude``/``linear_rows``; the fusion head follows
            ``mask_fusion`` only.
        include: callable ``(name, module) -> bool`` or modules; replaces the default unit selection.
        exclude: callable or modules never masked (with their submodules).
        heads: ``{linear: (num_heads, "rows" | "cols")}`` for separate q/k/v/o projections.
        significance: ``"confidence"`` (the paper's mutual-information rate of each modality's unimodal
            logits) or ``"speed"`` (equimodal's: how fast each modality's own head's loss is falling,
            relative; the faster-learning modality counts as dominant and is masked more, which protects
            the slow learner). ``"speed"`` uses heads of AMSS's own (below), trained on detached features
            when ``head_weight`` is 0.
        head_weight: weight of a unimodal loss per encoder through a linear head of AMSS's own on its
            features (0: none, the paper's AMSS). With own heads, put ``balancer.parameters()`` in the
            optimizer (the reference trainer does).
        feature_dims: feature size per modality for the own heads, for encoders without ``out_dim``.
        num_classes: number of classes for the own heads, for models without ``num_classes``.
        start_epoch: first epoch in which the method acts.
        end_epoch: last epoch in which it acts (``None``: no end).
        seed: seed of the sampling generator (identical on every DDP rank).

    Statistics (``stats()``, recorded on the device every step, ``{}`` outside the window): per modality
    ``m``: ``rho/m``, ``mi/m`` (the bound ``I_m``), ``k/m`` (update ratio used: the fixed ``ratio`` when
    one is set), ``kept_fraction/m`` (kept units / units), ``kept_grad_norm/m`` (norm of the kept part of
    the gradient / full norm, before reweighting), ``mean_weight/m`` (mean weight of kept units: 1 for
    AMSS) and ``grad_norm_ratio/m`` (norm of the masked, reweighted gradient / full norm); plus
    ``label_entropy``, ``fallback`` (1 if the fallback fired) and ``nonfinite`` (1 if the step was left
    unmasked for inf/NaN gradients; averaged over an epoch, these two are rates); per masked tensor
    ``layer_kept/<modality>/<name>``, the fraction of its units kept; with own heads ``uni_loss/m``.

    Attributes:
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
        temperature: float = 0.2,
        ratio_form: RatioForm = "one_minus_softmax",
        ratio_bias: float = 0.0,
        k_min: float = 0.1,
        k_max: float = 0.9,
        ratio: float | None = None,
        label_entropy: LabelEntropyMode = "exact",
        feature_entropy: FeatureEntropyMode = "mean",
        offset: float = 0.5,
        fallback_offset: float | None = None,
        fallback_ratio: float | Mapping[str, float] = 0.5,
        rho_momentum: float = 0.0,
        stable_softmax: bool = True,
        score: ScoreMode = "gn",
        sampler: SamplerName | None = None,
        rounding: Rounding = "ceil",
        reweight: ReweightMode | None = None,
        inclusion: InclusionMode = "conditional",
        max_weight: float | None = 100.0,
        score_floor: float | None = None,
        code_bias: float = 0.0,
        code_block_norm: bool = False,
        mask_encoders: bool = True,
        mask_fusion: MaskFusion = True,
        linear_rows: LinearRows = True,
        conv_units: ConvUnits = "filters",
        layer_kinds: LayerKinds = None,
        include: ModuleSelector | None = None,
        exclude: ModuleSelector | None = None,
        heads: Mapping[nn.Module, tuple[int, str]] | None = None,
        significance: Literal["confidence", "speed"] = "confidence",
        head_weight: float = 0.0,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        self.significance, self.head_weight = significance, float(head_weight)
        self.own_heads = self._own_heads(model, significance, head_weight, seed, feature_dims, num_classes)
        sampler = self.default_sampler if sampler is None else sampler
        reweight = self.default_reweight if reweight is None else reweight
        given = dict(
            label_entropy=label_entropy, feature_entropy=feature_entropy, score=score, sampler=sampler,
            rounding=rounding, reweight=reweight, inclusion=inclusion,
        )  # fmt: skip
        fb = _check_options(
            given, self.modalities, fallback_ratio, temperature=temperature, k_min=k_min, k_max=k_max,
            ratio_form=ratio_form, conv_units=conv_units, layer_kinds=layer_kinds, rho_momentum=rho_momentum,
            max_weight=max_weight, code_bias=code_bias,
        )  # fmt: skip
        self.ratio = check_fixed_ratio(ratio)
        if score_floor is None:
            score_floor = self.default_score_floor if reweight == "inverse_inclusion" else 0.0
        if not (math.isfinite(score_floor) and score_floor >= 0):
            raise ValueError(
                f"score_floor must be a finite number >= 0, found {score_floor!r} (0: no floor)."
            )
        if reweight == "code":
            log.warning(
                "AMSS+: reweight='code' reproduces the official weights 1/(q + 1/N + b), which are not unbiased and "
                "amplify gradients ~N/2 times when b = 0 (they diverged in our SGD runs, see docs/amss.md); prefer the default."
            )
        self.temperature, self.ratio_form, self.ratio_bias = float(temperature), ratio_form, float(ratio_bias)
        self.k_min, self.k_max, self.stable_softmax = float(k_min), float(k_max), bool(stable_softmax)
        self.label_entropy, self.feature_entropy = label_entropy, feature_entropy
        self.offset, self.fallback_offset, self.rho_momentum = (
            float(offset),
            fallback_offset,
            float(rho_momentum),
        )
        self.units = discover_units(
            model, self.modalities, include=include, exclude=exclude, heads=heads, linear_rows=linear_rows,
            mask_encoders=mask_encoders, mask_fusion=mask_fusion, conv_units=conv_units, layer_kinds=layer_kinds,
        )  # fmt: skip
        self.masker = GradientMasker(
            self.units, score=score, sampler=sampler, rounding=rounding, reweight=reweight, inclusion=inclusion,
            max_weight=max_weight, code_bias=code_bias, code_block_norm=code_block_norm, score_floor=score_floor,
        )  # fmt: skip
        self._fallback_ratio = torch.tensor([float(fb[m]) for m in self.modalities])
        self._warned_no_loss = False
        self._declare_state()
        self._layer_keys = [f"{u.modality}/{u.name}" for u in self.masker.tensors]

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

    def _own_heads(
        self,
        model: nn.Module,
        significance: str,
        head_weight: float,
        seed: int,
        feature_dims: Mapping[str, int] | None,
        num_classes: int | None,
    ) -> UnimodalHeads | None:
        """Unimodal heads of AMSS's own: for ``head_weight > 0`` (a unimodal loss per encoder) and for
        ``significance="speed"`` (the heads' learning speed is the significance); else ``None``."""
        if significance not in ("confidence", "speed"):
            raise ValueError(f"significance must be 'confidence' or 'speed', found {significance!r}.")
        if not (math.isfinite(head_weight) and head_weight >= 0):
            raise ValueError(
                f"head_weight must be a finite number >= 0, found {head_weight!r} (0: no own heads)."
            )
        if head_weight == 0 and significance == "confidence":
            return None
        return UnimodalHeads(
            model, self.modalities, feature_dims=feature_dims, num_classes=num_classes, seed=seed,
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
        source = (
            out
            if self.head_weight > 0 or out.features is None
            else out._replace(features={m: z.detach() for m, z in out.features.items()})
        )
        uni = torch.stack([F.cross_entropy(self.own_heads.logit(source, m), target) for m in self.modalities])
        self.accumulate("uni_loss_sum", uni)
        return fused + (self.head_weight or 1.0) * uni.sum()

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
            need_features=self.feature_entropy != "none",
        )
        self.accumulate("sig_sums", stats)

    def adjust_gradients(self) -> None:
        """Compute the ratios from the accumulated statistics, then sample and mask the gradients in place."""
        device = self.masker.device
        sig = self._significance(device)
        if self.significance == "speed" and self.uni_loss_sum is not None:
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
            return significance_from_sums(
                self.sig_sums, len(self.modalities), label_entropy_mode=self.label_entropy,
                feature_entropy_mode=self.feature_entropy, offset=self.offset, fallback_offset=self.fallback_offset,
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
        rho = sig["rho"]
        self._fallback_ratio = self._fallback_ratio.to(device)  # moved once, kept on the device
        if self.rho_momentum > 0:  # a NaN average (none yet) takes this step's rho
            ema = self.rho_momentum * self.rho_ema + (1 - self.rho_momentum) * rho
            self.rho_ema = rho = torch.where(torch.isfinite(ema), ema, rho)
        k = update_ratios(
            rho, self.temperature, form=self.ratio_form, bias=self.ratio_bias, k_min=self.k_min, k_max=self.k_max,
            fallback=sig["fallback"], fallback_ratio=self._fallback_ratio, stable=self.stable_softmax,
        )  # fmt: skip
        return fixed_ratios(self.ratio, k) if self.ratio is not None else k

    # ------------------------------------------------------------------ observability
    def counters(self) -> dict[str, int]:
        """Cumulative ``fallback_steps``, ``nonfinite_steps`` and ``active_steps`` (one host sync)."""
        names = ("fallback_steps", "nonfinite_steps", "active_steps")
        return {n: int(v) for n, v in zip(names, self.step_counts.tolist(), strict=True)}


@register_balancer("amss_plus")
class AMSSPlus(AMSS):
    """AMSS+ (Yang et al., TPAMI 2025): AMSS with kept units reweighted by their inverse inclusion probability.

    Default: the adaptive sampler's exact threshold-conditional inclusion probability over scores with a
    defensive floor (``score_floor=0.1``: 10 % of the group's mean score added to every unit's), weights
    capped at ``max_weight=100``; the expected masked gradient stays within 2 % of the true gradient at
    every update ratio (Monte-Carlo, ``tests/amss/test_amss_reweight.py``). Deviations: the floor (the
    paper samples on the scores alone, so rarely kept units get unbounded weights, which a cap then
    biases); the official code's weights ``1 / (q + 1/N + b)`` (``reweight="code"``) are neither
    unbiased nor stable (see ``docs/amss.md``).
    """

    default_reweight: ClassVar[ReweightMode] = "inverse_inclusion"
    default_score_floor: ClassVar[float] = 0.1


@register_balancer("uniform_mask")
class UniformMask(AMSS):
    """Uniform subnetwork masking, the uniform-sampling ablation of AMSS (Yang et al., TPAMI 2025).

    Same ratios ``k_m`` as AMSS, but the kept units of each tensor are drawn uniformly (the code's
    ``random`` sample mode) and not reweighted.
    """

    default_sampler: ClassVar[SamplerName] = "uniform"
