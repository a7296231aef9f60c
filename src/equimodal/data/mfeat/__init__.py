"""``mfeat``, the default dataset: UCI Multiple Features digits, vendored in this folder (``mfeat.npz``,
``ATTRIBUTION.txt``; CC BY 4.0). The loader is :mod:`.loader`; there is no prepare step."""

from .loader import MFEAT_DIMS, MFEAT_VIEWS, load_mfeat, parse_views, read_mfeat_arrays

__all__ = ["MFEAT_DIMS", "MFEAT_VIEWS", "load_mfeat", "parse_views", "read_mfeat_arrays"]
