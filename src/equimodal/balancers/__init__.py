"""Balancers: the registry and every built-in method (importing this module registers them)."""

# The built-in balancers: importing a module registers the balancers it defines.
from . import agm, amss, gblending, mla, mmpareto, mslr, none, ogm, opm, own_signal, pmr, unimodal  # noqa: F401
from .base import Balancer, DriverError, EpochData, Requirements
from .registry import create_balancer, get_balancer_class, list_balancers, register_balancer

__all__ = [
    "Balancer",
    "DriverError",
    "EpochData",
    "Requirements",
    "create_balancer",
    "get_balancer_class",
    "list_balancers",
    "register_balancer",
]
