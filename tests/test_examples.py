"""The README's own-loop example works with a model that only follows the contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import equimodal as em

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", em.list_balancers())
def test_own_loop_trains(name: str) -> None:
    """The example's loop, on a model written without equimodal's classes, drives every balancer."""
    options = {
        "unimodal": {"modality": "audio"},
        "mla": {"feature_dim": 32, "num_classes": 10},
        "remix": {"zero": "input"},  # its default zeroes features before model.fusion, which this model lacks
    }.get(name, {})
    if name == "umt":  # teachers: the encoders of another, independently initialised model of the example
        example = _load()
        torch.manual_seed(1)
        options = {"teachers": dict(example.TwoTowerNet().encoders.items())}
    if em.balancers.get_balancer_class(name).model_fusion:  # greedy: the example's late fusion is refused
        with pytest.raises(ValueError, match="mid fusion"):
            _load().main(name, steps=45, **options)
        return
    losses = _load().main(name, steps=45, **options)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
