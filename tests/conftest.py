"""Shared fixtures: tiny N-modality toy models and data that every balancer must handle.

The toy model and batches live in :mod:`equimodal.testing`, so that users check their own balancers on
the same ones; the names below are the tests' short aliases.
"""

from __future__ import annotations

import atexit
import copy
import csv
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from equimodal.testing import ToyEncoder, toy_batch, toy_epoch_data, toy_model

torch.set_num_threads(1)

make_toy_model = toy_model
make_toy_batch = toy_batch

__all__ = [
    "RUN_OPTIONS",
    "ToyEncoder",
    "make_toy_batch",
    "make_toy_model",
    "toy_epoch_data",
    "umt_options",
    "umt_teachers",
    "write_csv",
]


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


class BNEncoder(nn.Module):
    """A small encoder with a BatchNorm layer (for tests that check running statistics)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def umt_teachers(model: nn.Module, seed: int = 1) -> dict[str, nn.Module]:
    """Stand-in teachers for umt in the contract suites: copies of the model's encoders with weights drawn
    afresh from ``seed`` (they differ from the student, so the distillation term and its gradient are not
    zero). Trained teachers come from unimodal run folders (:data:`UMT_TEACHER_DIR`, test_umt.py)."""
    gen = torch.Generator().manual_seed(seed)
    teachers = {}
    for m, encoder in model.encoders.items():
        teacher = copy.deepcopy(encoder)
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.rand(p.shape, generator=gen).to(p) - 0.5)
        teachers[m] = teacher
    return teachers


def umt_options(model: nn.Module) -> dict[str, object]:
    """umt's options in the suites that build every balancer on a toy model."""
    return {"teachers": umt_teachers(model)}


# The mfeat fac,mor unimodal runs that umt's trainer runs distil from, trained once per session when a
# collected test needs them (the folder is passed to spawned DDP workers through the environment).
_TEACHER_KEY = "EQUIMODAL_TEST_UMT_TEACHERS"
if not os.environ.get(_TEACHER_KEY):
    os.environ[_TEACHER_KEY] = tempfile.mkdtemp(prefix="equimodal-umt-teachers-")
    atexit.register(shutil.rmtree, os.environ[_TEACHER_KEY], True)
UMT_TEACHER_DIR = Path(os.environ[_TEACHER_KEY])
UMT_TEACHER_RUN = (
    "data.options.views=fac,mor", "train.epochs=1", "train.progress=false", "train.probe=false",
    "data.batch_size=64", "train.num_threads=1",
)  # fmt: skip

RUN_OPTIONS: dict[str, tuple[str, ...]] = {
    "unimodal": ("balancer.options.modality=fac",),  # some parameters get no gradient
    "gblending": ("balancer.options.super_epoch_len=1",),
    "mla": ("balancer.options.start_epoch=1",),  # epoch 0 outside its window: both of its paths run
    "inforeg": ("balancer.options.threshold=1.0", "balancer.options.warmup_epochs=0"),  # epoch 0 inside
    # the prime window (no two-epoch warm-up), epoch 1 outside
    "umt": (
        f"balancer.options.teachers={{fac: '{UMT_TEACHER_DIR / 'fac'}', mor: '{UMT_TEACHER_DIR / 'mor'}'}}",
    ),
    "lfm": ("balancer.options.weighting=learnable",),  # the held-out split and the epoch step (the default
    # heuristic weighting runs in the contract, Lightning and example tests)
    "opm": ("balancer.options.start_epoch=1",),  # its default warm-up (epochs 0-5) would never end
    "ogm_plus": ("balancer.options.start_epoch=1",),
    # one-epoch phases: epoch 0 trains the fac learner, epoch 1 rectifies, epoch 2 trains mor (with GA)
    "reconboost": ("balancer.options.epochs_per_stage=1", "balancer.options.correct_epoch=1"),
    "greedy": ("model.fusion=mmtm",),  # needs mid fusion (MMTM gates); its windows open from epoch 1
    "sample_valuation": ("balancer.options.start_epoch=1",),  # its warm-up (epochs 0-4) would never end
    "modality_valuation": ("balancer.options.start_epoch=1",),
    "remix": ("balancer.options.warmup_epochs=1",),  # its default warm-up (epochs 0-9) would never end
    "relearning": ("balancer.options.first_reinit=1", "balancer.options.reinit_epoch=1"),  # diagnoses at
    # epochs 1, 2, 3 (the default first is epoch 21)
}
"""``--set`` overrides that make a short trainer run on mfeat ``fac,mor`` reach every path of a balancer."""


def train_umt_teachers() -> dict[str, Path]:
    """Train (once) the unimodal runs of mfeat ``fac`` and ``mor`` that RUN_OPTIONS' umt reads."""
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import train

    folders = {m: UMT_TEACHER_DIR / m for m in ("fac", "mor")}
    for m, folder in folders.items():
        if not (folder / "best.pt").is_file():
            cfg = load_config(
                None, [*UMT_TEACHER_RUN, "balancer.name=unimodal", f"balancer.options.modality={m}"]
            )
            train(cfg, folder)
    return folders


@pytest.fixture(scope="session", autouse=True)
def _umt_teacher_runs(request: pytest.FixtureRequest) -> None:
    """The umt teacher runs, when a collected test trains umt through RUN_OPTIONS."""
    if any("umt" in item.nodeid or "every_balancer" in item.name for item in request.session.items):
        train_umt_teachers()
