"""Balancers: the registry and every built-in method (importing this module registers them)."""

# The built-in balancers: importing a module registers the balancers it defines.
from . import (  # noqa: F401
    agm,
    amco,
    amss,
    aug,
    cggm,
    cml,
    dgl,
    gblending,
    greedy,
    inforeg,
    lfm,
    mbsd,
    mla,
    mmcosine,
    mmpareto,
    mslr,
    multitask,
    none,
    ogm,
    opm,
    pmr,
    reconboost,
    relearning,
    remix,
    ume,
    umt,
    unimodal,
    valuation,
)
from .base import Balancer, DriverError, EpochData, Requirements
from .plan import EpochPlan, PlannedDataset, indexed_loader
from .registry import create_balancer, get_balancer_class, list_balancers, register_balancer

__all__ = [
    "Balancer",
    "DriverError",
    "EpochData",
    "EpochPlan",
    "PlannedDataset",
    "Requirements",
    "create_balancer",
    "get_balancer_class",
    "indexed_loader",
    "list_balancers",
    "register_balancer",
]
