"""Shared fixtures: tiny N-modality toy models and data that every balancer must handle.

The toy model and batches live in :mod:`equimodal.testing`, so that users check their own balancers on
the same ones; the names below are the tests' short aliases.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from equimodal.testing import ToyEncoder, toy_batch, toy_epoch_data, toy_model

torch.set_num_threads(1)

make_toy_model = toy_model
make_toy_batch = toy_batch

__all__ = ["ToyEncoder", "make_toy_batch", "make_toy_model", "toy_epoch_data", "write_csv"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """A CSV file of ``header`` and ``rows`` (a custom dataset's table, a prepared folder's manifest)."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def _in_a_fresh_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in an empty working folder: a command's default output (``runs/...``) never lands in
    the repository, nor meets another test's."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(params=[2, 3, 4], ids=lambda m: f"M{m}")
def num_modalities(request: pytest.FixtureRequest) -> int:
    return int(request.param)


RUN_OPTIONS: dict[str, tuple[str, ...]] = {
    "unimodal": ("balancer.options.modality=fac",),  # some parameters get no gradient
    "gblending": ("balancer.options.super_epoch_len=1",),
    "mla": ("balancer.options.start_epoch=1",),  # epoch 0 outside its window: both of its paths run
    "opm": ("balancer.options.start_epoch=1",),  # its default warm-up (epochs 0-5) would never end
    "ogm_plus": ("balancer.options.start_epoch=1",),
}
"""``--set`` overrides that make a short trainer run on mfeat ``fac,mor`` reach every path of a balancer."""
