"""``EpochData`` takes a DataLoader, a re-iterable or a callable, with batches as (inputs, labels) pairs or
as mappings holding the labels, in every balancer that passes over epoch data (pmr, gblending, mslr)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch.utils.data import DataLoader, TensorDataset

import equimodal as em
from equimodal.testing import drive_step, optimizer_for

EPOCH_BALANCERS = {"pmr": {}, "gblending": {"super_epoch_len": 1}, "mslr": {}}
TRAIN = [make_toy_batch(2, 16, seed=11), make_toy_batch(2, 16, seed=12)]
HELDOUT = [make_toy_batch(2, 12, seed=13)]


def _samples(pairs: list[tuple[dict[str, torch.Tensor], torch.Tensor]], key: str) -> list[dict[str, Any]]:
    """One mapping per sample, the label under ``key`` (what a Dataset of dicts returns)."""
    return [{**{m: x[i] for m, x in batch.items()}, key: y[i]} for batch, y in pairs for i in range(len(y))]


def _forms() -> dict[str, em.EpochData]:
    """The same batches in every accepted form."""
    cpu = torch.device("cpu")

    def loader(pairs, key="label", size=16):
        return DataLoader(_samples(pairs, key), batch_size=size)  # dict batches, label inside

    return {
        "callable of pairs": em.EpochData(lambda: iter(TRAIN), lambda: iter(HELDOUT), cpu),
        "list of pairs": em.EpochData(TRAIN, HELDOUT, cpu),
        "DataLoader of dicts": em.EpochData(loader(TRAIN), loader(HELDOUT, size=12), cpu),
        "list of dicts": em.EpochData(
            [{**b, "label": y} for b, y in TRAIN], [{**b, "label": y} for b, y in HELDOUT], cpu
        ),
        "dicts, label_key": em.EpochData(
            loader(TRAIN, "target"), loader(HELDOUT, "target", 12), cpu, label_key="target"
        ),
    }


def _prepared(name: str, data: em.EpochData) -> dict[str, Any]:
    """The balancer's state after one prepare_epoch on ``data`` (mslr measures after one step)."""
    model = make_toy_model(2)
    bal = em.create_balancer(name, model, **EPOCH_BALANCERS[name])
    bal.set_epoch(0)
    bal.prepare_epoch(data)
    if name == "mslr":  # it measures from the second epoch on, after a step
        drive_step(bal, model, *make_toy_batch(2), optimizer_for(model, bal))
        bal.set_epoch(1)
        bal.prepare_epoch(data)
    state = bal.state_dict()
    return {k: state[k] for k in ("prototypes", "weights", "memory") if k in state}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.allclose(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("name", list(EPOCH_BALANCERS))
def test_every_form_gives_the_same_epoch_state(name: str) -> None:
    results = {form: _prepared(name, data) for form, data in _forms().items()}
    reference = results.pop("callable of pairs")
    assert reference  # prototypes, weights or the accuracy memory
    for form, state in results.items():
        assert _same(state, reference), f"{name}: {form} differs from the callable of pairs"


@pytest.mark.parametrize("name", list(EPOCH_BALANCERS))
def test_batches_of_another_form_say_what_was_found_and_expected(name: str) -> None:
    cpu = torch.device("cpu")
    tensors = TensorDataset(torch.randn(8, 5), torch.randn(8, 6), torch.randint(0, 3, (8,)))
    cases = [
        (DataLoader(tensors, batch_size=4), TypeError, r"batch 0 is a list of 3 \(Tensor, Tensor, Tensor\); expected"),
        ([{"m0": torch.randn(4, 5), "m1": torch.randn(4, 6), "y": torch.zeros(4).long()}], ValueError,
         r"without the labels under 'label' \(its keys: \['m0', 'm1', 'y'\]\).*label_key="),
        ([({"m0": torch.randn(4, 5), "m1": torch.randn(4, 6)}, [0, 1, 2, 0])], TypeError,
         "labels of type list; expected a tensor"),
    ]  # fmt: skip
    for train, error, words in cases:
        bal = em.create_balancer(name, make_toy_model(2), **EPOCH_BALANCERS[name])
        bal.set_epoch(0)
        if name == "mslr":  # mslr reads only the held-out split, after a step
            bal.num_steps = 1
        with pytest.raises(error, match=words):
            bal.prepare_epoch(em.EpochData(train, train, cpu))


def test_sources_that_cannot_be_passed_over_every_epoch_are_refused() -> None:
    batch, y = make_toy_batch(2)
    cpu = torch.device("cpu")
    for source, words in (
        (iter(TRAIN), "one-shot iterator"),
        ((b for b in TRAIN), "one-shot iterator"),
        ({**batch, "label": y}, "found one dict"),
        (3, "must be iterable or callable, found int"),
    ):
        with pytest.raises(TypeError, match=words):
            em.EpochData(source, None, cpu)
    with pytest.raises(TypeError, match="EpochData.heldout"):
        em.EpochData(TRAIN, iter(HELDOUT), cpu)
    data = em.EpochData(TRAIN, None, "cpu")
    assert data.device == cpu and len(list(data.batches())) == 2
    with pytest.raises(ValueError, match="no 'heldout' split"):
        list(data.batches("heldout"))
