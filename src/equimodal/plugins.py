"""Plugins: other packages add balancers, datasets, encoders, fusions and preparers to equimodal.

A plugin package names, in its ``pyproject.toml``, a module (or a function) in the entry-point group
``equimodal.plugins``::

    [project.entry-points."equimodal.plugins"]
    my_plugin = "my_package.equimodal_plugin"       # a module: importing it registers its items
    # my_plugin = "my_package.plugin:register"      # or a function, called with no arguments

The module registers its items with the ordinary decorators (``@equimodal.register_balancer("x")``, ...).
Plugins are loaded lazily and once: the first time any registry is listed or looked up (``equimodal
list balancers``, ``create_balancer``, a config naming an item), never by ``import equimodal``. A plugin
that fails to load is reported with its name and the error as a :class:`PluginWarning`, and skipped:
the built-ins and the other plugins keep working. A plugin that registers a name already taken (by a
built-in or another plugin) is a :class:`PluginClashError` naming both, raised by every lookup until
one of them is uninstalled: a name must mean one thing on every machine.
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Literal

ENTRY_POINT_GROUP = "equimodal.plugins"


class PluginWarning(UserWarning):
    """A plugin failed to load and was skipped (the message names it and the error)."""


class PluginClashError(ValueError):
    """A plugin registered a name that is already registered (the message names both owners)."""


class Plugins:
    """The plugins of one entry-point group, loaded once, on the first lookup of any registry.

    Args:
        group: the entry-point group to read.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self.state: Literal["pending", "loading", "done"] = "pending"
        self.loaded: list[str] = []
        self.failed: dict[str, str] = {}
        self.current: EntryPoint | None = None
        self.error: PluginClashError | None = None

    def load(self) -> None:
        """Load every plugin of the group, once; a later call returns at once (or raises the clash again).

        Raises:
            PluginClashError: a plugin registered a name that was taken.
        """
        if self.state == "pending":
            self.state = "loading"
            try:
                for point in entry_points(group=self.group):
                    self._load_one(point)
            finally:
                self.state = "done"
        if self.error is not None:
            raise self.error

    def _load_one(self, point: EntryPoint) -> None:
        self.current = point
        try:
            target = point.load()
            if not isinstance(target, (ModuleType, type)) and callable(target):
                target()
            self.loaded.append(point.name)
        except PluginClashError as err:
            self.error = err
        except Exception as err:  # a broken plugin must not take the built-ins down
            self.failed[point.name] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"equimodal plugin {point.name!r} ({point.value}) failed to load and is skipped: "
                f"{type(err).__name__}: {err}. The built-ins and other plugins work; fix or uninstall the "
                "package that declares it (entry-point group 'equimodal.plugins').",
                PluginWarning,
                stacklevel=2,
            )
        finally:
            self.current = None

    def describe_current(self) -> str | None:
        """``plugin 'name' (module)`` while a plugin is being loaded, else ``None``."""
        point = self.current
        return None if point is None else f"plugin {point.name!r} ({point.value})"


PLUGINS = Plugins()
"""The plugins every registry loads on its first lookup."""
