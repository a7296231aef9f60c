"""A Lightning callback that drives any equimodal balancer inside Lightning's own loop.

Lightning's ``on_before_optimizer_step`` is exactly the balancer's hook point: gradients are
accumulated and unscaled (with AMP), and not yet clipped. The LightningModule keeps the balancer and
calls ``balancer.loss`` in its ``training_step``; the callback does the rest::

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.balancer = equimodal.create_balancer("amss", model)

        def training_step(self, batch, _):
            return self.balancer.loss(self.model(batch), batch["label"], batch=batch)

    trainer = L.Trainer(callbacks=[BalancerCallback()])   # finds `module.balancer`

What the callback does for each kind of balancer (read from ``balancer.requirements``):

- every balancer: ``start_epoch`` at each epoch start, ``before_step`` at ``on_before_optimizer_step``
  (so ``accumulate_grad_batches`` works: one ``before_step`` per optimizer step), the balancer's recorded
  statistics logged after every batch as device tensors (Lightning reads them only when it writes its
  logs, so a step reads nothing on the host for them), the balancer's state in Lightning checkpoints (as
  plain data, checked by :func:`~equimodal.utils.io.plain_data`, so they load with
  ``torch.load(weights_only=True)``);
- balancers that need epoch data (``pmr``, ``gblending``, ``mslr``): ``start_epoch`` prepares the epoch
  with ``EpochData(train=<the trainer's train dataloader>, heldout=<the callback's heldout>)``;
  those that need a held-out part of train (``gblending``, ``mslr``) need ``BalancerCallback(heldout=...)``,
  a loader over samples removed from your training set (never val/test);
- balancers that plan each epoch's training data (``sample_valuation``, ``modality_valuation``,
  ``remix``): the module's training loader must be ``self.balancer.planned_loader(train_dataset,
  batch_size=...)`` (from ``train_dataloader()`` or passed to ``fit``). At each epoch start the callback
  hands the balancer the training split in a fixed order (``EpochData.indexed``, built from that loader's
  dataset, batch size, collate function and workers), the balancer makes the epoch's plan, and the loader
  follows it. Lightning reads an epoch's length when it loads the data, before the plan exists, so for the
  fit the planned loader reports no length and Lightning ends each epoch when the plan's entries run out
  (the progress bar shows no total; ``val_check_interval`` must stay at whole epochs). Any other training
  loader is refused at the first epoch start with the call to make; under DDP pass
  ``L.Trainer(use_distributed_sampler=False)`` (the planned loader shards itself over ranks, every rank
  with the same plan; the validation loaders are then not sharded by Lightning either). An epoch without
  a length also makes ``trainer.estimated_stepping_batches`` infinite: give a schedule that needs the
  total step count (OneCycleLR) the count yourself. A Lightning resume from a mid-epoch checkpoint
  restores the plan and trains that epoch's plan from its start (Lightning re-reads a map-style loader's
  epoch from its start);
- balancers that own their step (``mla``): the module uses manual optimisation and calls
  ``self.balancer.train_step(inputs, labels, self.optimizers())`` in ``training_step`` (the callback
  refuses automatic optimisation with that message). Lightning itself refuses ``accumulate_grad_batches``
  with manual optimisation: accumulate with ``train_step(..., micro_batches=k)`` instead. 16-bit AMP
  cannot apply to an owned step (no loss scaling there) and is refused; bf16 works.

Batches of the train and held-out loaders are turned into ``(inputs, labels)`` by ``unpack`` (default:
an ``(inputs, labels)`` pair, or a mapping with a ``"label"`` entry). Install with ``pip install
lightning`` (or ``equimodal[lightning]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "equimodal.integrations.lightning needs Lightning: pip install lightning (or 'equimodal[lightning]')."
    ) from exc

from torch import Tensor

from ..balancers import Balancer, DriverError, EpochData
from ..balancers.plan import indexed_loader, loader_plan
from ..types import LABEL_KEY
from ..utils.io import plain_data

Unpack = Callable[[Any], tuple[Mapping[str, Tensor], Tensor]]


def default_unpack(batch: Any) -> tuple[Mapping[str, Tensor], Tensor]:
    """``(inputs, labels)`` from an ``(inputs, labels)`` pair or a mapping holding ``"label"``."""
    if isinstance(batch, Mapping) and LABEL_KEY in batch:
        return batch, batch[LABEL_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        return batch[0], batch[1]
    raise TypeError(
        "BalancerCallback cannot read this batch: expected an (inputs: dict, labels) pair or a dict with a "
        f"'label' entry, found {type(batch).__name__}. Pass BalancerCallback(unpack=fn) with "
        "fn(batch) -> (inputs, labels)."
    )


class BalancerCallback(Callback):
    """Drive a LightningModule's balancer: epochs, epoch data, ``before_step``, logging, checkpoint state.

    Args:
        attribute: name of the module attribute holding the balancer.
        log_stats: log the balancer's statistics (``stat_values()``, prefixed ``balancer/``) after every
            training batch.
        heldout: a loader (any re-iterable) over a held-out part of train, for balancers whose
            ``requirements.heldout_fraction`` is positive.
        unpack: turns a loader batch into ``(inputs, labels)`` (see :func:`default_unpack`).
    """

    def __init__(
        self,
        attribute: str = "balancer",
        log_stats: bool = True,
        heldout: Iterable[Any] | None = None,
        unpack: Unpack = default_unpack,
    ) -> None:
        self.attribute = attribute
        self.log_stats = log_stats
        self.heldout = heldout
        self.unpack = unpack
        self._indexed: tuple[int, Any] | None = None  # (id of the training loader, its indexed loader)

    def _balancer(self, pl_module: Any) -> Balancer:
        balancer = getattr(pl_module, self.attribute, None)
        if not isinstance(balancer, Balancer):
            raise TypeError(
                f"BalancerCallback expected `{type(pl_module).__name__}.{self.attribute}` to be an "
                f"equimodal Balancer, found {type(balancer).__name__}. Build it in the module's __init__ "
                "with equimodal.create_balancer(name, model), or pass attribute=<its name>."
            )
        return balancer

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check, before any step, that this trainer and module can drive the balancer."""
        balancer = self._balancer(pl_module)
        for optimizer in getattr(trainer, "optimizers", None) or []:
            balancer.check_optimizer(optimizer)  # warns when an adaptive optimizer cancels the method
        req = balancer.requirements
        name = balancer.name
        if req.own_step:
            if pl_module.automatic_optimization:
                raise ValueError(
                    f"{name} runs its own optimisation step, so the module must use manual optimisation: set "
                    "`self.automatic_optimization = False` in __init__ and call "
                    "`self.balancer.train_step(inputs, labels, self.optimizers())` in training_step."
                )
            if str(trainer.precision).startswith("16"):
                raise ValueError(
                    f"{name} runs its own optimisation step, which has no AMP loss scaling; use "
                    "precision='bf16-mixed' or '32-true'."
                )
        if req.epoch_plan:
            connector = getattr(trainer, "_accelerator_connector", None)  # Lightning keeps it private
            if getattr(connector, "is_distributed", False) and getattr(
                connector, "use_distributed_sampler", False
            ):
                raise ValueError(
                    f"{name} plans each epoch's training data, and its planned loader shards the plan over the "
                    "ranks itself; Lightning would replace its sampler. Pass "
                    "L.Trainer(use_distributed_sampler=False)."
                )
            balancer._plan_source.sized = False  # Lightning runs each epoch until the plan's entries run out
        if req.heldout_fraction and self.heldout is None:
            raise ValueError(
                f"{name} needs held-out data carved from the training split (never val/test): pass "
                f"BalancerCallback(heldout=loader) over about {req.heldout_fraction:.0%} of your training "
                "samples, and leave those samples out of the training loader."
            )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore_length(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore_length(pl_module)

    def _restore_length(self, pl_module: Any) -> None:
        balancer = getattr(pl_module, self.attribute, None)
        if isinstance(balancer, Balancer):
            balancer._plan_source.sized = True  # the planned loader has a length again outside the fit
        self._indexed = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        balancer = self._balancer(pl_module)
        heldout = self.heldout
        indexed, size = None, None
        if balancer.requirements.epoch_plan:
            indexed, size = self._indexed_split(balancer, trainer.train_dataloader)
        data = EpochData(
            train=lambda: self._pairs(trainer.train_dataloader),
            heldout=(lambda: self._pairs(heldout)) if heldout is not None else None,
            device=pl_module.device,
            indexed=(lambda: self._pairs(indexed)) if indexed is not None else None,
            size=size,
        )
        balancer.start_epoch(trainer.current_epoch, data)

    def _indexed_split(self, balancer: Balancer, loader: Any) -> tuple[Any, int]:
        """The training split in a fixed order with its indices, from the module's planned loader."""
        planned = loader_plan(loader)
        if planned is None or planned.source is not balancer._plan_source:
            what = type(loader).__name__ if planned is None else "the planned loader of another balancer"
            raise DriverError(
                f"{balancer.name} plans each epoch's training data, so Lightning must train on its planned "
                f"loader; the training loader is {what}. Return "
                "self.balancer.planned_loader(train_dataset, batch_size=...) from train_dataloader() (or pass "
                "it to trainer.fit)."
            )
        if self._indexed is None or self._indexed[0] != id(loader):
            indexed = indexed_loader(
                planned.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
            )  # fmt: skip
            self._indexed = (id(loader), indexed)
        return self._indexed[1], len(planned.dataset)

    def _pairs(self, loader: Iterable[Any]) -> Iterator[tuple[Mapping[str, Tensor], Tensor]]:
        for batch in loader:
            yield self.unpack(batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        balancer = self._balancer(pl_module)
        if not balancer.requirements.own_step:  # an owned step adjusts its own gradients
            balancer.before_step()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_stats:
            names, values = self._balancer(pl_module).stat_values()
            if values is not None:
                stats = dict(zip((f"balancer/{n}" for n in names), values.unbind(), strict=True))
                pl_module.log_dict(stats, on_step=True)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = self._balancer(pl_module).state_dict()
        checkpoint["equimodal_balancer"] = plain_data(state, "the balancer's state_dict()")

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if "equimodal_balancer" in checkpoint:
            self._balancer(pl_module).load_state_dict(checkpoint["equimodal_balancer"])
