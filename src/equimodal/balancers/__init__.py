"""Balancers: the registry and every built-in method (importing this module registers them)."""

from .base import Balancer, EpochData
from .registry import create_balancer, get_balancer_class, list_balancers, register_balancer
from . import none  # noqa: E402,F401  (registers "none")

__all__ = [
    "Balancer",
    "EpochData",
    "create_balancer",
    "get_balancer_class",
    "list_balancers",
    "register_balancer",
]
