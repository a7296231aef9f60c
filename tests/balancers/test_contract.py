"""The contract suite (:mod:`equimodal.testing`) over every registered balancer, with 2, 3 and 4 modalities.

Each balancer must: give finite gradients after a step; be exactly plain joint training outside its
epoch window; round-trip its state so a fresh balancer continues identically; be deterministic for a
seed; give the same update with k micro-batches as with one batch k times larger; survive an
AMP-overflow step; and, driven by a bare two-call loop or the README's loop, either train exactly as the
fully driven method or refuse at the first call with an error naming the call it needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from conftest import umt_options

import equimodal as em
from equimodal import testing
from equimodal.types import modality_names

# Required constructor arguments per balancer, built from the model.
OPTIONS: dict[str, Any] = {
    "unimodal": lambda model: {"modality": modality_names(model)[0]},
    "umt": umt_options,  # stand-in teachers: frozen encoders of their own
    "opm": {"start_epoch": 0},  # its default window starts after the code's warm-up (epoch 6)
    "ogm_plus": {"start_epoch": 0},
    "sample_valuation": {"start_epoch": 0},  # its default window starts after the code's warm-up (epoch 5)
    "modality_valuation": {"start_epoch": 0},
    "relearning": {"first_reinit": 0, "reinit_epoch": 1},  # a diagnosis at every epoch (default: 21, 41, 61)
}

# Balancers that by design refuse fusions with auxiliary (detached) unimodal heads: amco, which masks the
# unimodal logits and sums them into the fused logits (concat and sum fusions only), and mbsd, whose default
# heads="shared" reads the model's unimodal logits. mmpareto and gblending train unimodal heads of their own
# on the encoder features (heads="separate") and refuse these fusions only with heads="shared" (tested in
# test_mmpareto.py / test_gblending.py).
REFUSE_AUX_FUSION: set[str] = {"amco", "mbsd"}

# What the bare two-call loop (no set_epoch, no batch=) and the README loop (set_epoch + batch=) do.
# Everything not listed trains exactly as the fully driven method in both loops.
LOOP_OUTCOME = {
    "agm": "refused: bare",  # needs batch=
    "umt": "refused: bare",  # its teachers read batch=
    "ogm": "refused: bare",  # bounded window (epochs 0-50): needs set_epoch
    "ogm_ge": "refused: bare",
    "amco": "refused: bare",  # bounded window (epochs 0-80), per-epoch ramp: needs set_epoch
    "pmr": "refused: bare, readme",  # needs prepare_epoch
    "gblending": "refused: bare, readme",
    "mslr": "refused: bare, readme",
    "relearning": "refused: bare, readme",
    "mla": "refused: bare, readme",  # owns its step: needs train_step
    "inforeg": "refused: bare",  # works per epoch (anchor, window): needs set_epoch
    "lfm": "refused: bare",  # its weights follow the epoch: needs set_epoch
    "opm": "refused: bare, readme",  # owns its step (it changes the forward pass)
    "ogm_plus": "refused: bare",  # bounded window (epochs 0-60 here): needs set_epoch
    "reconboost": "refused: bare",  # its stages follow the epoch: needs set_epoch
    "aug": "refused: bare",  # adds classifiers between epochs: needs set_epoch
    "greedy": "refused: bare",  # its windows open from epoch 1: needs set_epoch
    "sample_valuation": "refused: bare, readme",  # plans each epoch's data from its epoch data
    "modality_valuation": "refused: bare, readme",
    "remix": "refused: bare, readme",  # plans its epochs' data: needs prepare_epoch and planned batches
}

# Balancers that need mid fusion (``model_fusion``): the checks build the toy model they need
# (testing.toy_model_for); the late-fusion toy model is refused, naming what is needed.
REQUIRES_MID_FUSION = {n for n in em.list_balancers() if em.balancers.get_balancer_class(n).model_fusion}

CHECKS = [c for c in testing.CHECKS if c != "two_call_loop"]


@pytest.fixture(params=em.list_balancers())
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("check", CHECKS)
def test_contract(name: str, check: str, num_modalities: int) -> None:
    testing.CHECKS[check](name, num_modalities, OPTIONS.get(name))


@pytest.mark.parametrize("name", sorted(REQUIRES_MID_FUSION))
def test_a_mid_fusion_method_refuses_a_late_fusion_model(name: str) -> None:
    assert {"greedy"} <= REQUIRES_MID_FUSION
    with pytest.raises(
        ValueError, match=r"mid fusion.*MMTM.*found a MultimodalClassifier.*model\.fusion=mmtm"
    ):
        em.create_balancer(name, testing.toy_model(2), **OPTIONS.get(name, {}))


def test_two_call_loop(name: str, num_modalities: int) -> None:
    outcome = testing.check_two_call_loop(name, num_modalities, OPTIONS.get(name))
    assert outcome == LOOP_OUTCOME.get(name, "honoured")


def test_aux_fusion(name: str) -> None:
    """Auxiliary-head fusions work, or are refused at construction with a message naming the fusion."""
    accepted = name not in REFUSE_AUX_FUSION | REQUIRES_MID_FUSION
    assert testing.check_aux_fusion(name, OPTIONS.get(name)) == accepted


def test_check_balancer_runs_the_whole_suite_on_a_class() -> None:
    results = testing.check_balancer(em.balancers.get_balancer_class("ogm_ge"), modalities=(2,))
    assert results["two_call_loop/M2"] == "refused: bare"
    assert {k.split("/")[0] for k in results} == {*testing.CHECKS, "aux_fusion"}


def test_check_balancer_catches_a_broken_balancer() -> None:
    class ForgetsTheWindow(em.Balancer):
        """Scales gradients even outside its epoch window (overrides the public call, not the hook)."""

        def before_step(self) -> None:
            super().before_step()
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)

    with pytest.raises(AssertionError, match="joint_outside_window"):
        testing.check_balancer(ForgetsTheWindow, modalities=(2,))


def test_check_balancer_catches_state_poisoned_by_a_dropped_step() -> None:
    class KeepsNaN(em.Balancer):
        """A running confidence mean with no guard: one NaN micro-batch poisons every later step."""

        def __init__(self, model, *, start_epoch=0, end_epoch=None, seed=0):
            super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
            self.mean = torch.ones(())

        def observe(self, out, target, batch) -> None:
            self.mean = 0.9 * self.mean + 0.1 * out.logits.detach().softmax(1).amax(1).mean()

        def adjust_gradients(self) -> None:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.mean)

    with pytest.raises(AssertionError, match="after a dropped step \\(nan_batch\\)"):
        testing.check_overflow_tolerated(KeepsNaN)


def test_host_reads_counts_every_kind_of_read_and_restores_the_tensor_methods() -> None:
    t = torch.tensor([1.0, 0.0])
    reads_before = {name: getattr(torch.Tensor, name) for name in testing.HOST_METHODS}
    with testing.HostReads() as reads:
        t.sum().item(), t.tolist(), t.cpu(), t.numpy(), bool(t[0]), float(t[0]), int(t[0])
        [10, 20][t[1].long()]  # __index__
        torch.nonzero(t), t[t > 0], torch.unique(t)  # synchronising operators, no Tensor method
        t.new_tensor(2.0)  # host values: copied to a GPU, that copy waits (t.new_full((), 2.0) does not)
        (t * 2 + 1).clamp_min(0).exp(), torch.where(t > 0, t, 0.0), t.new_full((), 2.0)  # none of these
        with pytest.raises(RuntimeError, match="cannot be nested"), testing.HostReads():
            pass
    kinds = [c.split(" at ")[0] for c in reads.calls]
    assert kinds == [
        "Tensor.item", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "Tensor.__bool__", "Tensor.__float__",
        "Tensor.__int__", "Tensor.__index__", "aten.nonzero", "aten.index", "aten._unique2",
        "aten.lift_fresh",
    ]  # fmt: skip
    assert all("test_contract.py" in c for c in reads.calls)  # the caller outside torch
    assert {name: getattr(torch.Tensor, name) for name in testing.HOST_METHODS} == reads_before


class ReadsTheHost(em.Balancer):
    """Decides on the host whether to halve the gradients (one ``float()`` per step)."""

    def __init__(self, model, *, start_epoch=0, end_epoch=None, seed=0):
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        self.add_stat("loss_sum", torch.zeros(()))

    def observe(self, out, target, batch) -> None:
        self.loss_sum += torch.nn.functional.cross_entropy(out.logits.detach(), target)

    def adjust_gradients(self) -> None:
        if float(self.loss_sum) > 0.5:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)


def test_check_host_reads_finds_a_read_and_accepts_a_declared_budget() -> None:
    with pytest.raises(AssertionError, match=r"1 host read\(s\).*Tensor.__float__ at test_contract.py"):
        testing.check_host_reads(ReadsTheHost)

    class Declared(ReadsTheHost):
        step_host_reads = 1  # the halving is a host decision by design (a test of the budget)

    assert testing.check_host_reads(Declared) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("name", em.list_balancers())
def test_a_step_that_logs_nothing_does_not_synchronise_on_cuda(name: str) -> None:
    """What check_host_reads counts on the CPU, checked by CUDA itself (``set_sync_debug_mode("error")``)."""
    device = torch.device("cuda")
    model = testing.toy_model_for(name, 2).to(device)
    model.validate_inputs = False
    balancer = testing.build(name, model, OPTIONS.get(name))
    testing.start_epoch(balancer, 0, dataclasses.replace(testing.toy_epoch_data(2), device=device))
    optimizer = testing.optimizer_for(model, balancer)
    steps = [testing.toy_batch(2, 16, seed=s) for s in range(4)]
    steps = [({m: x.to(device) for m, x in batch.items()}, y.to(device)) for batch, y in steps]
    for batch, y in steps[:3]:
        testing.drive_step(balancer, model, batch, y, optimizer)
    batch, y = steps[3]
    optimizer.zero_grad(set_to_none=True)
    out = None if balancer.requirements.own_step else model(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if out is None:
            balancer.train_step(batch, y, optimizer)
        else:
            balancer.loss(out, y, batch=batch).backward()
            balancer.before_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
