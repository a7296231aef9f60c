"""equimodal: balanced multimodal learning (AMSS/AMSS+ and peer balancers) for PyTorch."""

from .balancers import Balancer, EpochData, create_balancer, list_balancers, register_balancer
from .models import MultimodalClassifier
from .types import MultimodalOutput

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "EpochData",
    "MultimodalClassifier",
    "MultimodalOutput",
    "__version__",
    "create_balancer",
    "list_balancers",
    "register_balancer",
]
