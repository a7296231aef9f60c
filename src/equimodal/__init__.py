"""equimodal: balanced multimodal learning (AMSS/AMSS+ and peer balancers) for PyTorch."""

from .balancers import (
    Balancer,
    DriverError,
    EpochData,
    EpochPlan,
    PlannedDataset,
    Requirements,
    create_balancer,
    indexed_loader,
    list_balancers,
    register_balancer,
)
from .data import list_datasets, load_dataset, register_dataset
from .models import (
    Fusion,
    MultimodalClassifier,
    create_encoder,
    create_fusion,
    list_encoders,
    list_fusions,
    register_encoder,
    register_fusion,
)
from .types import MultimodalOutput

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "DriverError",
    "EpochData",
    "EpochPlan",
    "Fusion",
    "MultimodalClassifier",
    "MultimodalOutput",
    "PlannedDataset",
    "Requirements",
    "__version__",
    "create_balancer",
    "create_encoder",
    "create_fusion",
    "indexed_loader",
    "list_balancers",
    "list_datasets",
    "list_encoders",
    "list_fusions",
    "load_dataset",
    "register_balancer",
    "register_dataset",
    "register_encoder",
    "register_fusion",
]
