"""Plain joint training: cross-entropy on the fused logits, no rebalancing."""

from __future__ import annotations

from .base import Balancer
from .registry import register_balancer


@register_balancer("none")
class JointTraining(Balancer):
    """Identity balancer: ``loss`` is CE on the fused logits and ``before_step`` leaves gradients alone.

    The smallest complete example of the contract; every other balancer is compared against it.
    """
