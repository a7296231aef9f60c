"""Models: the multimodal classifier, fusion heads and encoders."""

# The built-in encoders and fusions: importing a module registers what it defines (``encoders`` and
# ``fusion`` hold the small ones; bert needs the optional transformers, imported when one is built).
from . import bert, encoders, fusion, i3d, resnet50  # noqa: F401
from .classifier import MultimodalClassifier
from .encoders import create_encoder, list_encoders, register_encoder
from .fusion import Fusion, create_fusion, list_fusions, register_fusion
from .mmtm import MMTMClassifier

__all__ = [
    "Fusion",
    "MMTMClassifier",
    "MultimodalClassifier",
    "create_encoder",
    "create_fusion",
    "list_encoders",
    "list_fusions",
    "register_encoder",
    "register_fusion",
]
