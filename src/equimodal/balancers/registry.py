"""Registry of balancers: ``create_balancer``, ``list_balancers``, ``register_balancer``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry
from .base import Balancer

_BALANCERS: Registry[type[Balancer]] = Registry("balancer")


def register_balancer(name: str, *, overwrite: bool = False) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator registering a ``Balancer`` subclass under ``name``."""

    def add(cls: type[Balancer]) -> type[Balancer]:
        if not (isinstance(cls, type) and issubclass(cls, Balancer)):
            raise TypeError(f"register_balancer expects a Balancer subclass, found {cls!r}.")
        _BALANCERS.register(name, cls, overwrite=overwrite)
        return cls

    return add


def list_balancers() -> list[str]:
    """Names of all registered balancers, sorted."""
    return _BALANCERS.names()


def get_balancer_class(name: str) -> type[Balancer]:
    """The class registered as ``name`` (raises with close matches when unknown)."""
    return _BALANCERS.get(name)


def create_balancer(name: str, model: nn.Module, **kwargs: Any) -> Balancer:
    """Build the balancer registered as ``name`` for ``model``; unknown keyword arguments fail clearly."""
    cls = _BALANCERS.get(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [k for k in params if k not in ("self", "model")]
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise TypeError(
                f"Balancer {name!r} got unknown option(s) {unknown}. Valid options: {', '.join(valid)}."
            )
    return cls(model, **kwargs)
