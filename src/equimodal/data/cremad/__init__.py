"""``cremad``: CREMA-D (six emotions; audio and face video), the AMSS papers' audio-visual benchmark.

This folder is the whole dataset: :mod:`.prepare` (``equimodal prepare cremad``: the raw release into a
prepared folder), :mod:`.loader` (``load_dataset("cremad", root=...)``), the presets ``cremad.yaml``
(the official recipe) and ``cremad-tiny.yaml`` (a smoke run), and ``cremad.md`` (download, splits,
differences from the official pipeline).
"""

from .loader import load_cremad
from .prepare import prepare_cremad

__all__ = ["load_cremad", "prepare_cremad"]
