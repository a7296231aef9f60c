"""The pure math and unit discovery of AMSS / AMSS+ (Yang et al., "Learning to Rebalance Multi-Modal
Optimization by Adaptively Masking Subnetworks", TPAMI 2025).

The balancers themselves (``"amss"``, ``"amss_plus"``, ``"uniform_mask"``) live in
:mod:`equimodal.balancers.amss`; this package holds the small functions they are built from, usable on
their own:

- :mod:`.significance`: label entropy, feature entropy, mutual-information rate, additive statistics;
- :mod:`.ratios`: update ratios ``k_m`` for any M >= 2;
- :mod:`.sampling`: unit scores, keep counts, the five samplers, inclusion probabilities, weights;
- :mod:`.units`: mask units found by module type, with a selection API (:class:`UnitSelection`);
- :mod:`.masker`: the vectorised gradient masker;
- :mod:`.parts`: the balancer's options as parts (:class:`RatioRule`, :class:`Significance`,
  :class:`Sampler`, :class:`UnitSelection`), the flat-option mapping and the presets;
- :func:`describe_units` (from :mod:`equimodal.amss.explain`): what will be masked, and why the rest is not.
"""

from .explain import UnitsReport, describe_units  # after .units, which it reads
from .masker import MASK_STATS, GradientMasker
from .parts import AMSSParts, RatioRule, Sampler, Significance
from .ratios import RATIO_FORMS, update_ratios
from .sampling import (
    code_weights,
    inverse_inclusion_weights,
    keep_counts,
    sample_units,
    unit_scores,
    water_filling,
)
from .significance import (
    batch_sums,
    feature_entropy_from_sums,
    feature_entropy_per_sample,
    label_entropy,
    mutual_information_rate,
    significance,
    significance_from_sums,
)
from .units import UnitSelection, UnitTensor, discover_units, encoder_units, fusion_units

__all__ = [
    "UnitsReport",
    "describe_units",
    "AMSSParts",
    "RatioRule",
    "Sampler",
    "Significance",
    "UnitSelection",
    "MASK_STATS",
    "RATIO_FORMS",
    "GradientMasker",
    "UnitTensor",
    "batch_sums",
    "code_weights",
    "discover_units",
    "encoder_units",
    "feature_entropy_from_sums",
    "feature_entropy_per_sample",
    "fusion_units",
    "inverse_inclusion_weights",
    "keep_counts",
    "label_entropy",
    "mutual_information_rate",
    "sample_units",
    "significance",
    "significance_from_sums",
    "unit_scores",
    "update_ratios",
    "water_filling",
]
