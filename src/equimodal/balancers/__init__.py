"""Balancers: the registry and every built-in method (importing this module registers them)."""

from .base import Balancer, EpochData
from .registry import create_balancer, get_balancer_class, list_balancers, register_balancer

# Importing each module registers its balancers.
from . import none, amss, ogm, agm, pmr, unimodal, mslr, mmpareto, gblending, mla  # noqa: E402,F401,I001

__all__ = [
    "Balancer",
    "EpochData",
    "create_balancer",
    "get_balancer_class",
    "list_balancers",
    "register_balancer",
]
