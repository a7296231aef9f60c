"""The README's own-loop example works with a model that only follows the contract."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["none", "amss", "amss_plus", "ogm_ge", "agm", "mmpareto"])
def test_own_loop_trains(name: str) -> None:
    losses = _load().main(name, steps=40)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
