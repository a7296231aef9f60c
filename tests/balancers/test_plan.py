"""Epoch data plans: the plan, the planned dataset and sampler, and every driver honouring them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import equimodal as em
from equimodal.balancers import Balancer, DriverError, EpochData
from equimodal.balancers.passes import inference, keep_batchnorm_stats, sample_indices
from equimodal.balancers.plan import (
    INDEX_KEY,
    PLAN_WEIGHT_KEY,
    PLAN_ZEROED_KEY,
    EpochPlan,
    PlannedDataset,
    indexed_loader,
)
from equimodal.balancers.reinit import InitialWeights, reinitialise
from equimodal.balancers.stages import Schedule, Stage
from equimodal.data.base import TensorSplit, make_loader
from equimodal.testing import check_balancer, toy_batch, toy_epoch_data, toy_model


class CopyPlanner(Balancer):
    """Test planner: from epoch 1, every sample whose first-modality logit argmax is wrong gets a copy with
    every modality but the first zeroed and weight 2 (a per-sample pass over the indexed split)."""

    name = "test_copy_planner"
    plans_data = True

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.add_state("passes", 0)

    def on_epoch_start(self, data: EpochData) -> None:
        wrong = torch.zeros(data.size, dtype=torch.bool)
        for out, y, inputs in inference(self.model, data, "indexed"):
            first = out.unimodal_logits[self.modalities[0]]
            wrong[sample_indices(inputs)] = (first.argmax(1) != y).cpu()
        self.passes += 1
        if self.epoch == 0:
            return
        base = torch.arange(data.size)
        extra = base[wrong][:3] if bool(wrong.any()) else base[:2]
        indices = torch.cat([base, extra])
        zeroed = torch.zeros(len(indices), len(self.modalities), dtype=torch.bool)
        zeroed[data.size :, 1:] = True
        weights = torch.ones(len(indices))
        weights[data.size :] = 2.0
        self.set_plan(EpochPlan(indices, zeroed, weights, tuple(self.modalities)))

    def objective(self, out, target, batch):
        return self.weighted_cross_entropy(out.logits, target, batch)


def _dataset(n=20, num=2, seed=0):
    batch, y = toy_batch(num, n, seed=seed)
    return TensorSplit(batch, y)


def _data(ds, batch_size=8):
    indexed = indexed_loader(ds, batch_size=batch_size)
    return EpochData(train=[], heldout=None, device="cpu", indexed=indexed, size=len(ds))


def test_plan_is_validated():
    with pytest.raises(ValueError, match="1-d integer"):
        EpochPlan(torch.zeros(3), None, None, ("a", "b"))
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        EpochPlan(torch.arange(3), torch.zeros(3, 1, dtype=torch.bool), None, ("a", "b"))
    with pytest.raises(ValueError, match=">= 0"):
        EpochPlan(torch.arange(3), None, torch.tensor([1.0, -1.0, 1.0]), ("a", "b"))
    plan = EpochPlan(torch.tensor([0, 5]), None, None, ("a", "b"))
    with pytest.raises(ValueError, match="training split has 4 samples"):
        plan.check_size(4)


def test_planned_dataset_zeroes_copies_and_weights():
    ds = _dataset(6)
    plan = EpochPlan(
        torch.tensor([0, 1, 1]), torch.tensor([[False, False], [False, False], [False, True]]),
        torch.tensor([1.0, 1.0, 3.0]), ("m0", "m1"),
    )  # fmt: skip
    view = PlannedDataset(ds, plan)
    assert len(view) == 3
    inputs, label = view[2]
    assert int(inputs[INDEX_KEY]) == 1 and float(inputs[PLAN_WEIGHT_KEY]) == 3.0
    assert torch.count_nonzero(inputs["m1"]) == 0 and torch.equal(inputs["m0"], ds.inputs["m0"][1])
    assert int(label) == int(ds.labels[1])
    batch = view.__getitems__([0, 1, 2])  # the batch-level path equals the per-sample one
    for j in range(3):
        one, _ = view[j]
        for key in ("m0", "m1", INDEX_KEY, PLAN_WEIGHT_KEY, PLAN_ZEROED_KEY):
            assert torch.equal(batch.inputs[key][j], one[key])
    assert batch.inputs[PLAN_ZEROED_KEY].tolist() == plan.zeroed.tolist()  # which entries are copies
    # mapping items keep their form
    items = [{"m0": ds.inputs["m0"][i], "m1": ds.inputs["m1"][i], "label": ds.labels[i]} for i in range(6)]
    mapped = PlannedDataset(items, plan)[2]
    assert set(mapped) == {"m0", "m1", "label", INDEX_KEY, PLAN_WEIGHT_KEY, PLAN_ZEROED_KEY}
    assert torch.count_nonzero(mapped["m1"]) == 0


def test_own_loop_follows_the_plan_and_refuses_unplanned_batches():
    ds = _dataset(20)
    model = toy_model(2)
    balancer = CopyPlanner(model)
    loader = balancer.planned_loader(ds, batch_size=8)  # built once, for every epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sizes = []
    for epoch in range(3):
        balancer.start_epoch(epoch, _data(ds))
        seen = 0
        for inputs, y in loader:
            seen += len(y)
            loss = balancer.loss(model(inputs), y, batch=inputs)
            loss.backward()
            balancer.before_step()
            opt.step()
            opt.zero_grad()
        sizes.append(seen)
        stats = balancer.stats()
        if epoch:  # the plan's figures are logged with every step of its epoch
            assert stats["plan/entries"] == seen and stats["plan/train_size"] == 20
            assert stats["plan/extra_copies"] == seen - 20 == stats["plan/zeroed/m1"]
        else:
            assert "plan/entries" not in stats
    assert sizes[0] == 20 and sizes[1] > 20 and sizes[2] > 20
    assert balancer.passes == 3
    inputs, y = toy_batch(2, 8)
    with pytest.raises(DriverError, match="planned_loader"):
        balancer.loss(model(inputs), y, batch=inputs)
    with pytest.raises(ValueError, match="indexed"):
        balancer.start_epoch(3, EpochData(train=[], heldout=None, device="cpu"))


def test_planned_epoch_order_is_seeded_and_sharded():
    ds = _dataset(10)
    balancer = CopyPlanner(toy_model(2), seed=4)
    loader = balancer.planned_loader(ds, batch_size=4)
    balancer.start_epoch(0, _data(ds))
    first = torch.cat([b[INDEX_KEY] for b, _ in loader])
    again = torch.cat([b[INDEX_KEY] for b, _ in loader])
    assert torch.equal(first, again) and sorted(first.tolist()) == list(range(10))


def test_plan_round_trips_through_the_state():
    ds = _dataset(20)
    balancer = CopyPlanner(toy_model(2))
    balancer.start_epoch(0, _data(ds))
    balancer.start_epoch(1, _data(ds))
    plan = balancer.epoch_plan
    twin = CopyPlanner(toy_model(2))
    twin.load_state_dict(balancer.state_dict())
    assert torch.equal(twin.epoch_plan.indices, plan.indices)
    assert torch.equal(twin.epoch_plan.zeroed, plan.zeroed)
    twin.start_epoch(1, _data(ds))  # a resumed epoch is not planned again
    assert twin.passes == balancer.passes


def test_contract_suite_accepts_a_planner():
    results = check_balancer(CopyPlanner, modalities=(2, 3))
    assert results["two_call_loop/M2"].startswith("refused")
    assert results["epoch_plan/M3"].startswith("planned epochs [1, 2]")


def test_the_plan_check_catches_a_driver_that_ignores_the_plan(monkeypatch):
    from equimodal import testing

    class Ignored(CopyPlanner):  # a plan that the loader never sees: the check must fail
        def set_plan(self, plan):
            super().set_plan(plan)
            self._plan_source.plan = None
            self._shadow = plan

        @property
        def epoch_plan(self):
            return getattr(self, "_shadow", None) if self.epoch else None

    with pytest.raises(AssertionError, match="samples trained, the plan has"):
        testing.check_epoch_plan(Ignored)


def test_lightning_trains_a_user_planner_on_its_plans():
    """A planner written by a user (CopyPlanner) under Lightning: epoch 0 trains the 32 samples once, epoch
    1 the plan (32 + its copies, their modalities zeroed and weight 2), and the loss sees every entry."""
    lightning = pytest.importorskip("lightning")
    from equimodal.integrations.lightning import BalancerCallback
    from equimodal.testing import toy_samples

    class Module(lightning.LightningModule):
        def __init__(self, model, balancer):
            super().__init__()
            self.model, self.balancer, self.weights = model, balancer, []

        def training_step(self, batch, _):
            y = batch["label"]
            x = {k: v for k, v in batch.items() if k != "label"}
            self.weights.append((self.current_epoch, x[PLAN_WEIGHT_KEY].clone(), x["m1"].abs().sum(1) == 0))
            return self.balancer.loss(self.model(x), y, batch=x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.05)

    model = toy_model(2)
    balancer = CopyPlanner(model)
    module = Module(model, balancer)
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[BalancerCallback()],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=balancer.planned_loader(toy_samples(2), batch_size=8))
    plan = balancer.epoch_plan
    assert balancer.passes == 2 and plan is not None and len(plan) > 32
    for epoch, entries in ((0, 32), (1, len(plan))):
        w = torch.cat([w for e, w, _ in module.weights if e == epoch])
        zeroed = torch.cat([z for e, _, z in module.weights if e == epoch])
        assert len(w) == entries
        assert int((w == 2).sum()) == int(zeroed.sum()) == entries - 32


def test_trainer_shards_and_seeds_planned_loaders():
    ds = _dataset(10)
    plan = EpochPlan(torch.tensor([0, 1, 2, 3, 3, 3]), None, None, ("m0", "m1"))
    seen = []
    for rank in range(2):
        loader = make_loader(PlannedDataset(ds, plan), 2, train=True, seed=5, rank=rank, world_size=2)
        loader.sampler.set_epoch(1)
        seen += torch.cat([b[INDEX_KEY] for b, _ in loader]).tolist()
    assert sorted(seen) == [0, 1, 2, 3, 3, 3]


def test_inference_leaves_batchnorm_and_modes_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()
    before = model[1].running_mean.clone()
    with keep_batchnorm_stats(model):
        model(torch.randn(8, 3) + 5)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_reinitialise_pulls_towards_the_initial_weights_and_resets_optimizer_state():
    enc = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    init = InitialWeights({"a": enc})
    w0 = enc[0].weight.detach().clone()
    opt = torch.optim.SGD(enc.parameters(), lr=0.5, momentum=0.9)
    enc(torch.randn(5, 3)).sum().backward()
    opt.step()
    moved = enc[0].weight.detach().clone()
    enc.train()
    enc(torch.randn(5, 3) + 3)
    stats = enc[1].running_mean.clone()
    changed = reinitialise("a", enc, init, 0.25, optimizer=opt, optimizer_state="reset", batchnorm="keep")
    assert changed == 4
    torch.testing.assert_close(enc[0].weight, 0.75 * moved + 0.25 * w0)
    assert enc[0].weight not in opt.state and torch.equal(enc[1].running_mean, stats)
    reinitialise("a", enc, init, 1.0, batchnorm="blend")
    assert torch.equal(enc[0].weight, w0) and torch.equal(enc[1].running_mean, torch.zeros(3))


def test_schedule_finds_stages():
    schedule = Schedule([Stage("warmup", 2), Stage("remix", None)])
    assert [schedule.at(e).stage.name for e in range(4)] == ["warmup", "warmup", "remix", "remix"]
    assert schedule.at(2).first_epoch and schedule.boundaries() == [2]
    with pytest.raises(ValueError, match="not the last"):
        Schedule([Stage("a", None), Stage("b", 1)])


@pytest.fixture
def registered_planner():
    from equimodal.balancers.registry import BALANCERS

    em.register_balancer(CopyPlanner.name)(CopyPlanner)
    yield CopyPlanner.name
    BALANCERS._items.pop(CopyPlanner.name, None)
    BALANCERS._owners.pop(CopyPlanner.name, None)


TINY = [
    "data.options.views=fac,mor", "train.epochs=3", "train.progress=false", "train.probe=false",
    "data.batch_size=128", "train.checkpoint_every=3", "train.num_threads=1",
]  # fmt: skip


def test_trainer_trains_on_the_plan_and_resumes_mid_plan(registered_planner, tmp_path, monkeypatch):
    from equimodal.engine.checkpoint import Checkpointer
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import train

    cfg = load_config(None, [*TINY, f"balancer.name={registered_planner}"])
    seen = [0, 0, 0]
    loss = CopyPlanner.objective

    def counting(self, out, target, batch):
        seen[self.epoch] += int(target.shape[0])
        assert INDEX_KEY in batch and PLAN_WEIGHT_KEY in batch
        return loss(self, out, target, batch)

    with monkeypatch.context() as patch:
        patch.setattr(CopyPlanner, "objective", counting)
        reference = train(cfg)
    assert seen[1] > seen[0] and seen[2] > seen[0]  # epochs 1 and 2 trained on the copies too

    class Killed(Exception):
        pass

    save = Checkpointer.save_last

    def save_then_die(self, parts, progress, at, partial=None):
        save(self, parts, progress, at, partial)
        if at == 1 and partial is not None:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save_last", save_then_die)
        with pytest.raises(Killed):
            train(cfg, tmp_path / "run")
    resumed = train(cfg, tmp_path / "run")
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]


def test_on_disk_splits_keep_their_sample_keys_under_a_plan():
    from equimodal.data.base import FileSplit

    seen = []

    def reader(record, gen):
        seen.append((record, gen is not None))
        return {"m0": torch.full((3,), float(record)), "m1": torch.ones(2)}

    split = FileSplit(reader, torch.arange(10, 16), torch.arange(6) % 2, train=True, seed=1)
    plan = EpochPlan(
        torch.tensor([5, 5, 0]), torch.tensor([[0, 0], [0, 1], [1, 0]]).bool(), None, ("m0", "m1")
    )
    loader = make_loader(PlannedDataset(split, plan), 3, train=True, seed=2)
    loader.sampler.set_epoch(4)
    ((batch, labels),) = list(loader)
    order = batch[INDEX_KEY].tolist()
    assert sorted(order) == [0, 5, 5] and sorted(r for r, _ in seen) == [10, 15, 15]
    assert all(augmented for _, augmented in seen)  # training keys (with the epoch) reach the reader
    for j, i in enumerate(order):
        assert int(labels[j]) == i % 2
    zeroed_m1 = [j for j in range(3) if batch["m1"][j].abs().sum() == 0]
    zeroed_m0 = [j for j in range(3) if batch["m0"][j].abs().sum() == 0]
    assert len(zeroed_m1) == 1 and order[zeroed_m1[0]] == 5
    assert len(zeroed_m0) == 1 and order[zeroed_m0[0]] == 0


def test_a_plan_shorter_than_the_ranks_still_gives_every_rank_its_share(monkeypatch):
    """Padding repeats the order as often as needed: 1 entry over 3 ranks is 1 entry per rank (the
    trainer's sampler as well as a planned loader's)."""
    plan = EpochPlan(torch.tensor([4]), None, None, ("m0", "m1"))
    from equimodal.balancers.plan import PlanSampler, PlanSource

    view = PlannedDataset(_dataset(10), PlanSource(plan))
    seen = []
    for rank in range(3):
        monkeypatch.setattr(PlanSampler, "_world", staticmethod(lambda r=rank: (r, 3)))
        sampler = PlanSampler(view)
        seen.append(list(sampler))
        assert len(sampler) == 1
    assert seen == [[0], [0], [0]]
    for rank in range(3):
        loader = make_loader(view, 1, train=True, seed=5, rank=rank, world_size=3)
        loader.sampler.set_epoch(0)
        assert [b[INDEX_KEY].tolist() for b, _ in loader] == [[4]]


def test_the_default_objective_weights_each_entry_by_its_plan_weight():
    """A planner that sets weights and keeps the default objective trains on sum w_i CE_i / B."""

    class Weighing(Balancer):
        name = "test_weighing"
        plans_data = True

        def on_epoch_start(self, data):
            self.set_plan(
                EpochPlan(torch.arange(data.size), None, torch.linspace(0, 2, data.size), ("m0", "m1"))
            )

    model = toy_model(2)
    balancer = Weighing(model)
    balancer.start_epoch(0, toy_epoch_data(2))
    x, y = toy_batch(2, 8)
    w = torch.linspace(0, 1, 8)
    batch = {**x, INDEX_KEY: torch.arange(8), PLAN_WEIGHT_KEY: w}
    out = model(batch)
    expected = (F.cross_entropy(out.logits, y, reduction="none") * w).sum() / 8
    assert torch.allclose(balancer.loss(out, y, batch=batch), expected)


def test_reinitialise_refuses_unknown_modes():
    model = toy_model(2)
    initial = InitialWeights({"m0": model.encoders["m0"]})
    for kwargs, word in (
        ({"optimizer_state": "Reset"}, "optimizer_state"),
        ({"batchnorm": "blnd"}, "batchnorm"),
    ):
        with pytest.raises(ValueError, match=word):
            reinitialise("m0", model.encoders["m0"], initial, 0.5, **kwargs)
