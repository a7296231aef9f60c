"""The epoch fitter's non-finite policy: ``stop`` names where, ``skip`` drops and counts, nothing leaks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import umt_options
from torch import Tensor, nn

import equimodal as em
from equimodal.engine.fitting import (
    CHECK_EVERY,
    EpochFitter,
    EpochState,
    NonFiniteError,
    StepContext,
    params_finite,
)
from equimodal.testing import HostReads, ToyEncoder, drive_step, toy_batch, toy_epoch_data, toy_model_for


class Flaky(nn.Module):
    """An encoder that returns NaN features on the calls listed in ``bad`` (counted from 1)."""

    def __init__(self, in_dim: int, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.bad, self.calls = ToyEncoder(in_dim), bad, 0
        self.out_dim = self.inner.out_dim

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h = self.inner(x)
        return h * float("nan") if self.calls in self.bad else h


class BadGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        return g * float("nan")


def model_with(bad: set[int]) -> em.MultimodalClassifier:
    torch.manual_seed(0)
    return em.MultimodalClassifier({"m0": ToyEncoder(5), "m1": Flaky(6, bad)}, 3)


def loader(steps: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    return [toy_batch(2, 8, seed=s) for s in range(steps)]


def fit(model: nn.Module, mode: str, steps: int, balancer: str = "none", grad_accum: int = 1) -> EpochState:
    bal = em.create_balancer(balancer, model)
    bal.set_epoch(0)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)  # mmpareto's heads too
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(model, bal, opt, scaler, grad_accum, False, torch.device("cpu"), mode)
    return EpochFitter(ctx).fit(loader(steps), epoch=4)


def test_stop_names_the_epoch_step_and_modality() -> None:
    with pytest.raises(NonFiniteError, match=r"epoch 4, optimizer step 3 \(micro-batch 1\): the unimodal "
                       r"logits of modality 'm1' hold non-finite values"):  # fmt: skip
        fit(model_with({3}), "stop", steps=5)


def test_stop_reads_the_flags_only_at_check_points() -> None:
    """A NaN at step 3 of a long epoch is reported at the first check point, still naming step 3."""
    seen: list[int] = []
    model = model_with({3})
    bal = em.create_balancer("none", model)
    bal.set_epoch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(
        model, bal, opt, torch.amp.GradScaler("cpu", enabled=False), 1, False, torch.device("cpu")
    )
    with pytest.raises(NonFiniteError, match="optimizer step 3 "):
        EpochFitter(ctx).fit(
            loader(CHECK_EVERY + 5), after_step=lambda state, check: seen.append(state.steps)
        )
    assert seen == list(range(1, CHECK_EVERY))  # no check (and no sync) before step CHECK_EVERY


@pytest.mark.parametrize("balancer", ["none", "amss_plus", "ogm_ge", "mmpareto"])
def test_skip_drops_the_step_and_leaves_nothing_behind(balancer: str) -> None:
    """Skipping steps 2 and 3 leaves the model exactly where a run without those batches would be."""
    model = model_with({2, 3})
    clean = copy.deepcopy(model)
    clean.encoders["m1"].bad = set()
    state = fit(model, "skip", steps=5, balancer=balancer)
    assert (state.steps, state.skipped, state.batches) == (3, 2, 5)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if balancer == "none":  # no randomness: the skipped batches simply never happened
        bal = em.create_balancer("none", clean)
        opt = torch.optim.SGD(clean.parameters(), lr=0.1)
        for i, (x, y) in enumerate(loader(5)):
            if i in (1, 2):
                continue
            bal.loss(clean(x), y).backward()
            bal.before_step()
            opt.step()
            opt.zero_grad()
        for (n, p), q in zip(model.named_parameters(), clean.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=n)


def test_skip_drops_the_whole_accumulation_group() -> None:
    state = fit(model_with({3}), "skip", steps=6, grad_accum=2)  # micro-batch 3 is in the 2nd group
    assert (state.steps, state.skipped) == (2, 1)


def test_a_non_finite_gradient_with_a_finite_loss() -> None:
    """Skip mode sees it in the gradients; stop mode lets the trainer's parameter check catch it."""

    class Hook(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls, self.out_dim = ToyEncoder(5), 0, 8

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1
            h = self.inner(x)
            return BadGrad.apply(h) if self.calls == 2 else h

    torch.manual_seed(0)
    model = em.MultimodalClassifier({"m0": Hook(), "m1": ToyEncoder(6)}, 3)
    state = fit(copy.deepcopy(model), "skip", steps=4)
    assert (state.steps, state.skipped) == (3, 1)
    with pytest.raises(NonFiniteError, match="optimizer step 3 "):  # the next loss is NaN
        fit(copy.deepcopy(model), "stop", steps=4)
    stopped = copy.deepcopy(model)
    fit(stopped, "stop", steps=2)  # the bad step is the last: every loss was finite ...
    assert not params_finite(stopped)  # ... and the trainer's parameter check stops the run


def test_the_running_training_accuracy_counts_each_forward_pass(tmp_path) -> None:
    model = model_with(set())
    bal = em.create_balancer("none", model)
    bal.set_epoch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the counts can be checked afterwards
    ctx = StepContext(
        model, bal, opt, torch.amp.GradScaler("cpu", enabled=False), 1, False, torch.device("cpu")
    )
    state = EpochFitter(ctx).fit(loader(3))
    acc = state.train_accuracy(["m0", "m1"])
    with torch.no_grad():
        outs = [(model(x), y) for x, y in loader(3)]
    expect = sum(int((o.logits.argmax(1) == y).sum()) for o, y in outs) / 24
    expect_m1 = sum(int((o.unimodal_logits["m1"].argmax(1) == y).sum()) for o, y in outs) / 24
    assert acc["train_acc"] == pytest.approx(expect) and acc["train_acc_m1"] == pytest.approx(expect_m1)
    assert state.to_dict()["seen"] == 24
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import train

    cfg = load_config(None, ["data.options.views=fac,mor", "train.epochs=2", "train.probe=false",
                             "train.progress=false"])  # fmt: skip
    train(cfg, tmp_path / "r")
    header, *rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    cols = header.split(",")
    assert {"train_acc", "train_acc_fac", "train_acc_mor"} <= set(cols)
    assert 0.3 < float(rows[-1].split(",")[cols.index("train_acc")]) <= 1.0


@pytest.mark.parametrize("name", em.list_balancers())
def test_a_step_of_the_reference_fitter_that_logs_nothing_reads_nothing_on_the_host(name: str) -> None:
    """Between two optimizer steps (after the first three: a first loss() checks the labels' range, own heads
    are checked at the second step) the fitter reads nothing on the host, the balancer's statistics
    included: they are summed on the device and read once per epoch."""
    mid_fusion = em.balancers.get_balancer_class(name).model_fusion  # greedy: an MMTM toy model
    model = toy_model_for(name, 2) if mid_fusion else model_with(set())
    model.validate_inputs = False  # the model's own input check reads the host; the trainer's models skip it
    bal = em.create_balancer(name, model, **_options(name, model))
    bal.start_epoch(0, toy_epoch_data(2))
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = StepContext(model, bal, opt, scaler, 2, False, torch.device("cpu"))
    seen: list[int] = []
    with HostReads() as reads:
        state = EpochFitter(ctx).fit(
            loader(12), after_step=lambda state, check: seen.append(len(reads.calls))
        )
    per_step = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert len(seen) == 6 and per_step[2:] == [0, 0, 0], reads.calls
    assert state.mean_stats() == _python_means(name)


def _options(name: str, model: nn.Module) -> dict[str, object]:
    """The options a balancer needs besides the model."""
    return {"unimodal": {"modality": "m0"}, "umt": umt_options(model)}.get(name, {})


def _python_means(name: str) -> dict[str, float]:
    """The epoch means as the fitter computed them before: each step's stats() summed on the host, in order
    (the same run, driven by drive_step)."""
    model = (
        toy_model_for(name, 2) if em.balancers.get_balancer_class(name).model_fusion else model_with(set())
    )
    bal = em.create_balancer(name, model, **_options(name, model))
    bal.start_epoch(0, toy_epoch_data(2))
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    batches = loader(12)
    for i in range(0, 12, 2):
        merged = {k: torch.cat([b[k] for b, _ in batches[i : i + 2]]) for k in batches[i][0]}
        drive_step(bal, model, merged, torch.cat([y for _, y in batches[i : i + 2]]), opt, micro_batches=2)
        for k, v in bal.stats().items():
            if math.isfinite(v):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
    return {k: v / counts[k] for k, v in sums.items()}


def test_statistic_sums_on_the_device_equal_the_sums_of_the_floats_and_resume() -> None:
    rows = [
        {"a": 0.1, "b": float("nan")},
        {"a": 1e-17, "b": 2.5, "c": float("inf")},
        {"a": 0.3, "c": 1.0},
    ]
    state = EpochState()
    for row in rows:
        state.add_stats(list(row), torch.tensor(list(row.values()), dtype=torch.float64))
    expect_a = (0.0 + 0.1) + 1e-17 + 0.3  # in order: float addition is not associative
    assert state.mean_stats() == {"a": expect_a / 3, "b": 2.5, "c": 1.0}
    saved = state.to_dict()
    assert saved["stat_counts"] == {"a": 3, "b": 1, "c": 1}
    resumed = EpochState(**saved)
    resumed.add_stats(["a"], torch.tensor([0.7], dtype=torch.float64))
    assert resumed.mean_stats()["a"] == (expect_a + 0.7) / 4
