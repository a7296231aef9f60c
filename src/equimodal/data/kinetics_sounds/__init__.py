"""``kinetics_sounds``: Kinetics-Sounds (audio and video clips of the classes one can hear).

This folder is the whole dataset: :mod:`.prepare` (``equimodal prepare kinetics_sounds``), :mod:`.loader`
(``load_dataset("kinetics_sounds", root=...)``), the presets ``kinetics_sounds.yaml`` and
``kinetics_sounds-tiny.yaml``, and ``kinetics_sounds.md`` (versions, download, differences).
"""

from .loader import load_kinetics_sounds
from .prepare import prepare_kinetics_sounds

__all__ = ["load_kinetics_sounds", "prepare_kinetics_sounds"]
