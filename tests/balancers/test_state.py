"""What a balancer declares (``add_stat``, ``add_state``, ``record``) and what the base class does with it:
accumulate, reset, save, restore, undo a non-finite step on the device; and the one epoch start."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from conftest import make_toy_batch, make_toy_model, toy_epoch_data
from torch import nn

import equimodal as em
from equimodal.testing import HostReads


class Counting(em.Balancer):
    """Sums the rows of a step, keeps a running total (rolled back) and a step count (not rolled back)."""

    def __init__(
        self, model: nn.Module, *, start_epoch: int = 0, end_epoch: int | None = None, seed: int = 0
    ):
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        self.add_stat("rows", torch.zeros(()))
        self.add_stat("first_logits")  # sized by the first micro-batch
        self.add_state("total", torch.zeros(()))
        self.add_state("steps_seen", torch.zeros(()), rollback=False)
        self.add_state("notes", {"kind": "counting"})
        self.head = nn.Linear(2, 2)
        self.add_state("head", self.head)
        self.seen_at_step: list[float] = []

    def observe(self, out, target, batch) -> None:
        self.rows += float(target.shape[0])
        self.accumulate("first_logits", out.logits.detach()[:1])

    def adjust_gradients(self) -> None:
        self.seen_at_step.append(self.rows)
        self.total = self.total + self.rows + self.first_logits.sum() * 0  # NaN logits make it NaN
        self.steps_seen = self.steps_seen + 1
        self.record("rows", self.rows)
        self.record("per_modality", torch.arange(len(self.modalities), dtype=torch.float32))


def _micro_batches(bal: em.Balancer, model: nn.Module, sizes: tuple[int, ...]) -> None:
    """The micro-batches of one optimizer step (gradients zeroed first)."""
    model.zero_grad(set_to_none=True)
    for i, n in enumerate(sizes):
        batch, y = make_toy_batch(2, n, seed=i)
        bal.loss(model(batch), y).backward()


def test_statistics_are_summed_over_micro_batches_then_reset() -> None:
    model = make_toy_model(2)
    bal = Counting(model)
    _micro_batches(bal, model, (8, 4))
    assert float(bal.rows) == 12 and bal.first_logits.shape == (1, 3)
    bal.before_step()
    assert float(bal.seen_at_step[-1]) == 12  # adjust_gradients saw both micro-batches
    assert float(bal.rows) == 0 and bal.first_logits is None  # reset after the step
    assert bal.stats() == {"rows": 12.0, "per_modality/m0": 0.0, "per_modality/m1": 1.0}
    names, values = bal.stat_values()
    assert names == ["rows", "per_modality/m0", "per_modality/m1"] and values.dtype == torch.float64
    _micro_batches(bal, model, (4,))
    assert bal.stats() == {}  # a new step's first loss() clears the last step's figures
    with pytest.raises(ValueError, match=r"shape \(1, 3\), found a value of shape \(2, 3\)"):
        bal.accumulate("first_logits", torch.zeros(2, 3))


def test_state_round_trips_tensors_plain_data_and_modules() -> None:
    model = make_toy_model(2)
    bal = Counting(model)
    for _ in range(2):
        _micro_batches(bal, model, (8,))
        bal.before_step()
    bal.notes["kind"] = "changed"
    with torch.no_grad():
        bal.head.weight.fill_(3.0)
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    fresh = Counting(make_toy_model(2))
    weight = fresh.head.weight
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert float(fresh.total) == 16 and float(fresh.steps_seen) == 2 and fresh.notes == {"kind": "changed"}
    assert fresh.head.weight is weight and bool((weight == 3.0).all())  # loaded in place
    state = bal.state_dict()
    state.pop("total")
    with pytest.raises(ValueError, match=r"no 'total' entry: it was saved by a balancer built with other"):
        fresh.load_state_dict(state)
    state = {**bal.state_dict(), "total": None}  # a state saved before the tensor existed: its default
    fresh.load_state_dict(state)
    assert float(fresh.total) == 0


def test_a_non_finite_step_restores_the_state_on_the_device_without_a_host_read() -> None:
    model = make_toy_model(2)
    model.validate_inputs = False
    bal = Counting(model)
    for _ in range(2):
        _micro_batches(bal, model, (8,))
        bal.before_step()
    assert float(bal.total) == 16
    _micro_batches(bal, model, (8,))
    next(model.encoders["m0"].parameters()).grad.fill_(float("inf"))  # an AMP overflow
    with HostReads() as reads:
        bal.before_step()
    assert reads.calls == []
    assert float(bal.total) == 16  # rolled back
    assert float(bal.steps_seen) == 3  # rollback=False: it sees the step
    model.zero_grad(set_to_none=True)
    batch, y = make_toy_batch(2, 8)
    out = model(batch)
    bal.loss(out._replace(logits=out.logits * float("nan")), y).backward()  # a non-finite statistic
    bal.before_step()
    assert float(bal.total) == 16 and float(bal.steps_seen) == 4
    _micro_batches(bal, model, (8,))
    bal.before_step()
    assert float(bal.total) == 24  # finite steps count again


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("epoch", "stat", "a key of the base class's state_dict()"),
        ("x-y", "state", "a Python identifier"),
        ("active", "state", "already an attribute of"),
        ("rows", "stat", "declared twice"),
    ],
)
def test_declared_names_are_checked(name: str, kind: str, words: str) -> None:
    bal = Counting(make_toy_model(2))
    with pytest.raises(ValueError, match=words):
        (bal.add_stat if kind == "stat" else bal.add_state)(name, torch.zeros(()))


def test_record_checks_its_shape() -> None:
    bal = Counting(make_toy_model(2))
    with pytest.raises(ValueError, match=r"one value per key \(2\), found shape \(3,\)"):
        bal.record("k", torch.zeros(3))
    bal.record("layer", torch.ones(3), keys=["a", "b", "c"])
    assert bal.stats() == {"layer/a": 1.0, "layer/b": 1.0, "layer/c": 1.0}


class PerEpoch(em.Balancer):
    """Counts the epochs it was prepared for."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.add_state("prepared", [])

    def on_epoch_start(self, data: em.EpochData) -> None:
        self.prepared.append(self.epoch)


def test_start_epoch_sets_the_epoch_and_prepares_it_once() -> None:
    bal = PerEpoch(make_toy_model(2))
    with pytest.raises(em.DriverError, match=r"call balancer.start_epoch\(epoch, EpochData\(train=..."):
        bal.start_epoch(0)
    data = toy_epoch_data(2)
    bal.start_epoch(0, data)
    bal.start_epoch(0, data)  # the same epoch again: not prepared twice
    bal.start_epoch(1, data)
    assert bal.prepared == [0, 1] and bal.epoch == 1
    resumed = PerEpoch(make_toy_model(2))
    resumed.load_state_dict(bal.state_dict())  # a run resumed in the middle of epoch 1
    resumed.start_epoch(1)  # needs no data: epoch 1 was prepared before the checkpoint
    assert resumed.prepared == [0, 1]
    plain = em.create_balancer("none", make_toy_model(2))
    plain.start_epoch(3)  # no epoch data needed, none given
    assert plain.epoch == 3


def test_labels_are_range_checked_at_the_first_call_only() -> None:
    model = make_toy_model(2)
    model.validate_inputs = False
    bal = em.create_balancer("none", model)
    batch, y = make_toy_batch(2, 8)
    out = model(batch)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 2\]"):
        bal.loss(out, torch.full_like(y, 7))
    bal.loss(out, y)  # the first call that passes
    with HostReads() as reads:
        bal.loss(out, y).backward()
        bal.before_step()
    assert reads.calls == []


def test_a_saved_state_of_another_shape_is_refused_not_loaded() -> None:
    """A checkpoint of an older layout (InfoReg's one window for all, before one per modality) must not
    load silently into the declared per-modality shapes."""
    balancer = em.create_balancer("inforeg", make_toy_model(2))
    state = balancer.state_dict()
    state["window"] = torch.ones((), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"'window' has shape \(\), expected \(2,\): it was saved by a"):
        balancer.load_state_dict(state)
    grown = em.create_balancer("inforeg", make_toy_model(2))
    grown.load_state_dict(balancer.state_dict())  # the same shapes load
    assert grown.window.shape == (2,)
