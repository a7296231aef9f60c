"""The Lightning callback drives every registered balancer through Lightning's own loop.

Each balancer trained by Lightning (two epochs, gradient accumulation over 2 micro-batches where the
balancer allows it) must end with exactly the parameters that :func:`equimodal.testing.drive_step`
gives on the same data; what the callback cannot drive it refuses with a message naming the fix.
"""

from __future__ import annotations

import copy
import json
import types
from collections import Counter
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_toy_batch, make_toy_model, umt_teachers

import equimodal as em
from equimodal.balancers.base import split_batch
from equimodal.balancers.registry import get_balancer_class
from equimodal.integrations.lightning import BalancerCallback
from equimodal.testing import assert_same, drive_step, optimizer_for, snapshot, toy_model_for, toy_samples

OPTIONS: dict[str, dict[str, Any]] = {"unimodal": {"modality": "m0"}}
LR = 0.1


class Module(L.LightningModule):
    def __init__(self, model: torch.nn.Module, balancer: em.Balancer, micro_batches: int = 1) -> None:
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.micro_batches = micro_batches
        self.automatic_optimization = not balancer.requirements.own_step

    def training_step(self, batch: Any, _: int) -> Any:
        x, y = batch
        if not self.automatic_optimization:
            return self.balancer.train_step(x, y, self.optimizers(), micro_batches=self.micro_batches)
        return self.balancer.loss(self.model(x), y, batch=x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        own = self.balancer.parameters() if isinstance(self.balancer, em.Balancer) else []
        return torch.optim.SGD([*self.model.parameters(), *own], lr=LR)


def _trainer(epochs: int = 2, accumulate: int = 1, **callback: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
        callbacks=[BalancerCallback(**callback)],
    )  # fmt: skip


def _data(steps: int = 3) -> tuple[list, list, list]:
    """Whole batches of 16, the same as micro-batches of 8, and a held-out batch."""
    whole = [make_toy_batch(2, 16, seed=i) for i in range(steps)]
    micro = [part for x, y in whole for part in split_batch(x, y, 2)]
    return whole, micro, [make_toy_batch(2, 12, seed=99)]


@pytest.mark.parametrize("name", em.list_balancers())
def test_lightning_equals_the_reference_driver(name: str) -> None:
    model = toy_model_for(name, 2)  # greedy needs its MMTM (mid-fusion) toy model
    twin = copy.deepcopy(model)
    options = {"teachers": umt_teachers(model)} if name == "umt" else OPTIONS.get(name, {})
    lit_bal = em.create_balancer(name, model, seed=1, **options)
    ref_bal = em.create_balancer(name, twin, seed=1, **options)
    whole, micro, held = _data()
    # a planner refuses another loader; test_lightning_follows_each_epoch_plan trains it on its own
    if lit_bal.requirements.epoch_plan:
        loader = torch.utils.data.DataLoader(micro, batch_size=None)
        with pytest.raises(em.DriverError, match=r"self.balancer.planned_loader\(train_dataset"):
            _trainer(heldout=held).fit(Module(model, lit_bal), train_dataloaders=loader)
        assert lit_bal.num_steps == 0
        return
    owned = lit_bal.requirements.own_step
    accumulate = 1 if owned else 2
    loader = torch.utils.data.DataLoader(whole if owned else micro, batch_size=None)
    _trainer(accumulate=accumulate, heldout=held).fit(Module(model, lit_bal), train_dataloaders=loader)

    opt = optimizer_for(twin, ref_bal, LR)
    train = whole if owned else micro
    data = em.EpochData(train=lambda: iter(train), heldout=lambda: iter(held), device=torch.device("cpu"))
    for epoch in range(2):
        ref_bal.start_epoch(epoch, data)
        for x, y in whole:
            drive_step(ref_bal, twin, x, y, opt, micro_batches=accumulate)
    assert lit_bal.num_steps == ref_bal.num_steps == 6
    assert_same(snapshot(model, lit_bal), snapshot(twin, ref_bal), what=f"{name} under Lightning")


PLAN_FROM_EPOCH_1: dict[str, dict[str, Any]] = {
    "sample_valuation": {"start_epoch": 1},
    "modality_valuation": {"start_epoch": 1},
    "remix": {"warmup_epochs": 1},
}
"""Options that make each planner plan from epoch 1 (its warm-up shortened)."""


class MappingModule(Module):
    """Trains on mapping batches (modalities and ``"label"``), as a planned loader over ``toy_samples``."""

    def __init__(self, model: torch.nn.Module, balancer: em.Balancer) -> None:
        super().__init__(model, balancer)
        self.sizes: list[int] = []

    def training_step(self, batch: Any, _: int) -> Any:
        y = batch["label"]
        x = {k: v for k, v in batch.items() if k != "label"}
        self.sizes.append(int(y.shape[0]))
        return self.balancer.loss(self.model(x), y, batch=x)


def test_every_planner_is_made_to_plan_from_epoch_1_here() -> None:
    assert {n for n in em.list_balancers() if get_balancer_class(n).plans_data} == set(PLAN_FROM_EPOCH_1)


@pytest.mark.parametrize("name", sorted(PLAN_FROM_EPOCH_1))
def test_lightning_follows_each_epoch_plan(name: str) -> None:
    """Over its planned loader, a planner under Lightning trains each epoch on exactly the plan (epochs of
    another length than the split), ends with the parameters of a hand-written loop over the same planned
    loader, and the loader has its length back after the fit."""
    model = toy_model_for(name, 2)
    twin = copy.deepcopy(model)
    lit_bal = em.create_balancer(name, model, seed=1, **PLAN_FROM_EPOCH_1[name])
    ref_bal = em.create_balancer(name, twin, seed=1, **PLAN_FROM_EPOCH_1[name])
    samples = toy_samples(2)
    module = MappingModule(model, lit_bal)
    lit_loader = lit_bal.planned_loader(samples, batch_size=8)
    _trainer(3).fit(module, train_dataloaders=lit_loader)

    loader = ref_bal.planned_loader(samples, batch_size=8)
    data = em.EpochData(
        train=loader, heldout=None, device="cpu", indexed=em.indexed_loader(samples, batch_size=8), size=32
    )
    opt = optimizer_for(twin, ref_bal, LR)
    per_epoch, sizes = [], []
    for epoch in range(3):
        ref_bal.start_epoch(epoch, data)
        plan = ref_bal.epoch_plan
        per_epoch.append(len(samples) if plan is None else len(plan))
        for batch in loader:
            y = batch.pop("label")
            sizes.append(int(y.shape[0]))
            drive_step(ref_bal, twin, batch, y, opt)
    assert per_epoch[0] == 32 and sum(module.sizes) == sum(per_epoch)
    assert module.sizes == sizes and lit_bal.num_steps == ref_bal.num_steps
    assert lit_bal.epoch_plan is not None and torch.equal(
        lit_bal.epoch_plan.indices, ref_bal.epoch_plan.indices
    )
    assert_same(snapshot(model, lit_bal), snapshot(twin, ref_bal), what=f"{name} under Lightning")
    assert len(lit_loader) == len(loader)  # sized again once the fit is over


def test_a_planner_refuses_a_loader_it_does_not_plan_and_lightning_s_ddp_sampler() -> None:
    model = toy_model_for("remix", 2)
    balancer = em.create_balancer("remix", model, warmup_epochs=1)
    other = em.create_balancer("remix", copy.deepcopy(model))
    samples = toy_samples(2)
    with pytest.raises(em.DriverError, match="the planned loader of another balancer"):
        _trainer(1).fit(MappingModule(model, balancer), other.planned_loader(samples, batch_size=8))
    assert len(balancer.planned_loader(samples, batch_size=8)) == 4  # sized again after the failed fit
    ddp = types.SimpleNamespace(
        optimizers=[],
        _accelerator_connector=types.SimpleNamespace(is_distributed=True, use_distributed_sampler=True),
    )
    with pytest.raises(ValueError, match=r"use_distributed_sampler=False"):
        BalancerCallback().on_fit_start(ddp, MappingModule(model, balancer))


def test_an_owned_step_accumulates_through_train_step_micro_batches() -> None:
    """mla under Lightning (manual optimisation) with train_step(..., micro_batches=2) equals the reference
    driver with 2 micro-batches; 16-bit AMP is refused for it, naming the precisions that work."""
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    lit_bal, ref_bal = em.create_balancer("mla", model, seed=1), em.create_balancer("mla", twin, seed=1)
    whole, _, _ = _data()
    loader = torch.utils.data.DataLoader(whole, batch_size=None)
    _trainer().fit(Module(model, lit_bal, micro_batches=2), train_dataloaders=loader)
    opt = optimizer_for(twin, ref_bal, LR)
    for epoch in range(2):
        ref_bal.start_epoch(epoch)
        for x, y in whole:
            drive_step(ref_bal, twin, x, y, opt, micro_batches=2)
    assert_same(snapshot(model, lit_bal), snapshot(twin, ref_bal), what="mla with micro_batches=2")
    half = types.SimpleNamespace(precision="16-mixed")  # Lightning turns 16-mixed into bf16 on a CPU
    with pytest.raises(ValueError, match=r"precision='bf16-mixed' or '32-true'"):
        BalancerCallback().on_fit_start(half, Module(model, lit_bal))


def test_before_step_runs_once_per_optimizer_step_and_logs() -> None:
    model = make_toy_model(2)
    module = Module(model, em.create_balancer("amss", model))
    calls = []
    original = module.balancer.before_step
    module.balancer.before_step = lambda: (calls.append(1), original())[1]
    _, micro, _ = _data(3)
    trainer = _trainer(2, accumulate=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro, batch_size=None))
    assert len(calls) == 6 and module.balancer.epoch == 1
    assert 0.0 < module.balancer.stats()["kept_fraction/m0"] < 1.0
    assert "balancer/kept_fraction/m0" in trainer.callback_metrics


def test_refuses_what_it_cannot_drive_and_says_how() -> None:
    whole, _, _ = _data(1)
    loader = torch.utils.data.DataLoader(whole, batch_size=None)
    model = make_toy_model(2)
    auto = Module(model, em.create_balancer("mla", model))
    auto.automatic_optimization = True
    with pytest.raises(ValueError, match=r"automatic_optimization = False.*train_step"):
        _trainer(1).fit(auto, train_dataloaders=loader)
    with pytest.raises(Exception, match="accumulation is not supported for manual optimization"):
        _trainer(1, accumulate=2).fit(
            Module(model, em.create_balancer("mla", model)), train_dataloaders=loader
        )
    blend = Module(model, em.create_balancer("gblending", model))
    with pytest.raises(ValueError, match=r"BalancerCallback\(heldout=loader\)"):
        _trainer(1).fit(blend, train_dataloaders=loader)
    plain = Module(model, em.create_balancer("none", model))
    plain.balancer = None
    with pytest.raises(TypeError, match="expected `Module.balancer` to be an equimodal Balancer"):
        _trainer(1).fit(plain, train_dataloaders=loader)


def test_checkpoint_round_trips_the_balancer_state_as_plain_data(tmp_path) -> None:
    model = make_toy_model(2)
    module = Module(model, em.create_balancer("agm", model))
    whole, _, _ = _data(2)
    trainer = _trainer(1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(whole, batch_size=None))
    state = module.balancer.state_dict
    module.balancer.state_dict = lambda: {**state(), "count": np.int64(state()["count"])}  # a numpy number
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    fresh = Module(copy.deepcopy(model), em.create_balancer("agm", model))
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)  # Lightning's default for local files
    BalancerCallback().on_load_checkpoint(trainer, fresh, ckpt)
    assert fresh.balancer.count == module.balancer.count == 2
    assert torch.equal(fresh.balancer.running, module.balancer.running)


class RankRecorder(MappingModule):
    """Writes, per rank and epoch, the plan it holds and the sample indices it trained on."""

    def __init__(self, model: torch.nn.Module, balancer: em.Balancer, out: str) -> None:
        super().__init__(model, balancer)
        self.out, self.seen, self.log_ = out, [], []

    def training_step(self, batch: Any, i: int) -> Any:
        self.seen.extend(batch["index"].tolist())
        return super().training_step(batch, i)

    def on_train_epoch_end(self) -> None:
        plan = self.balancer.epoch_plan
        self.log_.append({"plan": None if plan is None else plan.indices.tolist(), "seen": self.seen})
        self.seen = []
        with open(f"{self.out}/rank{self.global_rank}.json", "w") as fh:
            json.dump(self.log_, fh)


@pytest.mark.slow
def test_lightning_ddp_gives_every_rank_the_same_plan_and_a_shard_of_it(tmp_path) -> None:
    """Two CPU processes (ddp_spawn, gloo): each epoch both ranks hold the same plan, and their batches
    together are the plan's entries (padded to a multiple of 2 by repeating the first ones)."""
    model = toy_model_for("sample_valuation", 2)
    balancer = em.create_balancer("sample_valuation", model, seed=1, start_epoch=1)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn", use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[BalancerCallback()],
    )  # fmt: skip
    module = RankRecorder(model, balancer, str(tmp_path))
    trainer.fit(module, train_dataloaders=balancer.planned_loader(toy_samples(2), batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    for epoch, (zero, one) in enumerate(zip(*ranks, strict=True)):
        assert zero["plan"] == one["plan"], f"epoch {epoch}: the ranks hold different plans"
        entries = list(range(32)) if zero["plan"] is None else zero["plan"]
        assert len(zero["seen"]) == len(one["seen"]) == -(-len(entries) // 2)
        assert Counter(zero["seen"] + one["seen"]) >= Counter(entries)  # every entry, padding extra
    assert ranks[0][1]["plan"] is not None and len(ranks[0][1]["plan"]) > 32  # epoch 1 planned, with copies
