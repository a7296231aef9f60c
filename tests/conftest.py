"""Shared fixtures: tiny N-modality toy models and data that every balancer must handle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equimodal as em

torch.set_num_threads(1)


class ToyEncoder(nn.Module):
    """Conv1d + Linear encoder so that conv filters, neurons and biases all exist."""

    def __init__(self, in_dim: int, out_dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


def make_toy_model(num_modalities: int = 2, num_classes: int = 3, fusion: str = "concat", seed: int = 0):
    """A toy multimodal classifier with modalities m0..m{M-1} of input sizes 5, 6, 7, ..."""
    torch.manual_seed(seed)
    encoders = {f"m{i}": ToyEncoder(5 + i) for i in range(num_modalities)}
    return em.MultimodalClassifier(encoders, num_classes, fusion=fusion)


def make_toy_batch(num_modalities: int = 2, batch_size: int = 16, num_classes: int = 3, seed: int = 0):
    """A batch whose label is weakly encoded in every modality (so losses can fall)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    batch = {}
    for i in range(num_modalities):
        x = torch.randn(batch_size, 5 + i, generator=g)
        x[:, 0] += (1.0 + i) * y.float()
        batch[f"m{i}"] = x
    return batch, y


@pytest.fixture(params=[2, 3, 4], ids=lambda m: f"M{m}")
def num_modalities(request: pytest.FixtureRequest) -> int:
    return int(request.param)
