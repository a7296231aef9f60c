"""``equimodal prepare <dataset> --raw DIR --out DIR``: raw downloads into the layout the loaders read.

Preparers are registered with :func:`register_preparer` (one per dataset, in the dataset's folder,
``equimodal/data/<name>/prepare.py``, imported with :mod:`equimodal.data`) and run by :func:`prepare`.
The machinery they share (parallel, resumable, atomic, fault-tolerant work, the prepared layout) is in
:mod:`equimodal.prepare.base`, the media decoding in :mod:`equimodal.prepare.media`; the media libraries
are imported only when a preparer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..registry import Registry

Preparer = Callable[..., dict[str, Any]]
"""``preparer(raw: Path, out: Path, *, workers: int, **options) -> info`` (the ``prepare.json`` content)."""

PREPARERS: Registry[Preparer] = Registry(
    "preparer", skip=2, example="equimodal prepare {name} --raw DIR --out DIR --set {key}=..."
)


def register_preparer(name: str, *, overwrite: bool = False) -> Callable[[Preparer], Preparer]:
    """Decorator registering a dataset's preparer under ``name``."""
    return PREPARERS.decorator(name, overwrite=overwrite)


def list_preparers() -> list[str]:
    """The datasets ``equimodal prepare`` knows."""
    return PREPARERS.names()


def prepare(
    name: str, raw: str | Path, out: str | Path, *, workers: int | None = None, **options: Any
) -> dict[str, Any]:
    """Prepare dataset ``name`` from its raw download ``raw`` into ``out``; returns what ``prepare.json`` holds.

    Unknown names and options fail with close matches; options given as strings are converted. ``out`` is
    claimed for the whole preparation (:func:`~equimodal.utils.claim.claim_folder`): a second preparation into
    it is refused while this one runs.
    """
    from ..utils.claim import claim_folder
    from .base import default_workers

    raw, out = Path(raw).expanduser(), Path(out).expanduser()
    if not raw.is_dir():
        raise FileNotFoundError(
            f"No raw {name} folder at {str(raw)!r}: pass --raw the folder you downloaded and unpacked."
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file, not a folder; pass a folder path.")
    checked = PREPARERS.check(name, {**options, "workers": workers or default_workers()})
    with claim_folder(out):
        return PREPARERS.get(name)(raw, out, **checked)
