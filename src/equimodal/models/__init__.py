"""Models: the multimodal classifier, fusion heads and encoders."""

from .classifier import MultimodalClassifier
from .encoders import create_encoder, list_encoders, register_encoder
from .fusion import Fusion, create_fusion, list_fusions, register_fusion

__all__ = [
    "Fusion",
    "MultimodalClassifier",
    "create_encoder",
    "create_fusion",
    "list_encoders",
    "list_fusions",
    "register_encoder",
    "register_fusion",
]

# Encoders of the paper's workloads (importing registers them; bert needs the optional transformers).
from . import bert, i3d, resnet50  # noqa: E402,F401
