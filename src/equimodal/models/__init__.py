"""Models: the multimodal classifier, fusion heads and encoders."""

from .classifier import MultimodalClassifier
from .fusion import Fusion, create_fusion, list_fusions

__all__ = ["Fusion", "MultimodalClassifier", "create_fusion", "list_fusions"]
