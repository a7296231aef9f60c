"""Registry of balancers: ``register_balancer``, ``list_balancers``, ``create_balancer``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry
from .base import Balancer

BALANCERS: Registry[type[Balancer]] = Registry(
    "balancer",
    base=Balancer,
    skip=1,
    example="create_balancer({name!r}, model, {key}=...) or --set balancer.options.{key}=...",
)


def register_balancer(name: str, *, overwrite: bool = False) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator registering a ``Balancer`` subclass under ``name`` (it also sets ``cls.name``)."""
    return BALANCERS.decorator(name, overwrite=overwrite)


def list_balancers() -> list[str]:
    """Names of all registered balancers, sorted."""
    return BALANCERS.names()


def get_balancer_class(name: str) -> type[Balancer]:
    """The class registered as ``name`` (raises with close matches when unknown)."""
    return BALANCERS.get(name)


def create_balancer(name: str, model: nn.Module, **options: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``model``.

    Unknown names and options fail with close matches and the valid list; string option values are
    converted to the option's type (``"0.5"`` -> ``0.5``), and ``Literal`` options are checked.
    """
    return BALANCERS.create(name, model, **options)
