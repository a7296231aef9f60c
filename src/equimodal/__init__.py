"""equimodal: balanced multimodal learning (AMSS/AMSS+ and peer balancers) for PyTorch."""

from .balancers import (
    Balancer,
    DriverError,
    EpochData,
    Requirements,
    create_balancer,
    list_balancers,
    register_balancer,
)
from .data import list_datasets, load_dataset, register_dataset
from .models import MultimodalClassifier, create_encoder, list_encoders, list_fusions
from .types import MultimodalOutput

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "DriverError",
    "EpochData",
    "MultimodalClassifier",
    "MultimodalOutput",
    "Requirements",
    "__version__",
    "create_balancer",
    "create_encoder",
    "list_balancers",
    "list_datasets",
    "list_encoders",
    "list_fusions",
    "load_dataset",
    "register_balancer",
    "register_dataset",
]
