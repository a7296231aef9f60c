"""``nvgesture``: NVGesture (25 hand gestures; RGB, depth and optical flow clips).

This folder is the whole dataset: :mod:`.prepare` (``equimodal prepare nvgesture``), :mod:`.loader`
(``load_dataset("nvgesture", root=...)``), the presets ``nvgesture.yaml`` and ``nvgesture-tiny.yaml``,
and ``nvgesture.md`` (download, flow, deviations).
"""

from .loader import load_nvgesture
from .prepare import prepare_nvgesture

__all__ = ["load_nvgesture", "prepare_nvgesture"]
