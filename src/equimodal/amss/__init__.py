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
- :mod:`.explain`: :func:`~equimodal.amss.explain.describe_units`, what will be masked and why the rest
  is not. It is not imported here: it builds the balancer through the registry, a layer above this package.

The functions of :mod:`.sampling` and :mod:`.significance` are used from their modules
(``equimodal.amss.sampling.water_filling``); this package exports the parts and classes.
"""

from .masker import MASK_STATS, GradientMasker
from .parts import AMSSParts, RatioRule, Sampler, Significance
from .ratios import RATIO_FORMS, update_ratios
from .units import UnitSelection, UnitTensor, discover_units, encoder_units, fusion_units

__all__ = [
    "AMSSParts",
    "RatioRule",
    "Sampler",
    "Significance",
    "UnitSelection",
    "MASK_STATS",
    "RATIO_FORMS",
    "GradientMasker",
    "UnitTensor",
    "discover_units",
    "encoder_units",
    "fusion_units",
    "update_ratios",
]
