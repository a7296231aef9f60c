"""The Lightning callback drives a balancer through Lightning's own loop."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.integrations.lightning import BalancerCallback


class Module(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.model = make_toy_model(2)
        self.balancer = em.create_balancer(name, self.model)

    def training_step(self, batch, _):
        x, y = batch
        return self.balancer.loss(self.model(x), y, batch=x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(steps: int = 6) -> torch.utils.data.DataLoader:
    batches = [make_toy_batch(2, 16, seed=i) for i in range(steps)]
    return torch.utils.data.DataLoader(batches, batch_size=None)  # already batched


def _trainer(epochs: int = 2) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[BalancerCallback()],
    )  # fmt: skip


def test_before_step_runs_once_per_optimizer_step_and_masks() -> None:
    module = Module("amss")
    calls = []
    original = module.balancer.before_step
    module.balancer.before_step = lambda: (calls.append(1), original())[1]
    _trainer(2).fit(module, train_dataloaders=_loader(6))
    assert len(calls) == 12 and module.balancer.epoch == 1
    assert 0.0 < module.balancer.stats()["kept_fraction/m0"] < 1.0


def test_refuses_what_it_cannot_drive() -> None:
    module = Module("mla")
    with pytest.raises(ValueError, match="owns_step"):
        _trainer(1).fit(module, train_dataloaders=_loader(1))
    plain = Module("none")
    plain.balancer = None
    with pytest.raises(TypeError, match="expected `Module.balancer` to be an equimodal Balancer"):
        _trainer(1).fit(plain, train_dataloaders=_loader(1))
