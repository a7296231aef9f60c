"""A small named registry with close-match errors, shared by balancers, datasets, models and fusions."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def unknown_name_error(kind: str, name: str, valid: list[str]) -> ValueError:
    """Build the error for an unknown name: what was asked, the closest matches and the valid list."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(sorted(valid))}.")


class Registry(Generic[T]):
    """Maps names to factories; ``get`` fails with close matches and the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None, *, overwrite: bool = False) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is omitted."""

        def add(obj: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
            if name in self._items and not overwrite:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered. "
                    "Pick another name or pass overwrite=True."
                )
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        """Return the item registered as ``name`` or raise a helpful ``ValueError``."""
        if name not in self._items:
            raise unknown_name_error(self.kind, str(name), list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
