"""A Lightning callback that runs a balancer's ``before_step`` at Lightning's matching hook.

Lightning's ``on_before_optimizer_step`` is exactly the balancer's hook point: gradients are
accumulated and unscaled (with AMP), and not yet clipped. The LightningModule keeps the balancer and
calls ``balancer.loss`` in its ``training_step``; this callback does the rest::

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.balancer = equimodal.create_balancer("amss", model)

        def training_step(self, batch, _):
            return self.balancer.loss(self.model(batch), batch["label"], batch=batch)

    trainer = L.Trainer(callbacks=[BalancerCallback()])   # finds `module.balancer`

Install with ``pip install lightning`` (or ``equimodal[lightning]``). The callback also sets the epoch,
logs ``balancer.stats()`` each step, and stores the balancer's state in Lightning checkpoints.
Balancers that own the step (``mla``) or need epoch data (``pmr``, ``gblending``, ``mslr``) need hooks
this callback does not drive; it refuses them with a clear error.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "equimodal.integrations.lightning needs Lightning: pip install lightning (or 'equimodal[lightning]')."
    ) from exc

from ..balancers import Balancer


class BalancerCallback(Callback):
    """Drive a LightningModule's balancer: ``set_epoch``, ``before_step``, logging and checkpoint state.

    Args:
        attribute: name of the module attribute holding the balancer.
        log_stats: log ``balancer.stats()`` (prefixed ``balancer/``) after every optimizer step.
    """

    def __init__(self, attribute: str = "balancer", log_stats: bool = True) -> None:
        self.attribute = attribute
        self.log_stats = log_stats

    def _balancer(self, pl_module: Any) -> Balancer:
        balancer = getattr(pl_module, self.attribute, None)
        if not isinstance(balancer, Balancer):
            raise TypeError(
                f"BalancerCallback expected `{type(pl_module).__name__}.{self.attribute}` to be an "
                f"equimodal Balancer, found {type(balancer).__name__}. Build it in the module's __init__ "
                "with equimodal.create_balancer(name, model), or pass attribute=<its name>."
            )
        if balancer.owns_step or balancer.needs_epoch_data:
            raise ValueError(
                f"Balancer {balancer.name!r} needs hooks this callback does not drive (owns_step="
                f"{balancer.owns_step}, needs_epoch_data={balancer.needs_epoch_data}); use the reference "
                "trainer (`equimodal train`) or call those hooks from your module."
            )
        return balancer

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._balancer(pl_module).set_epoch(trainer.current_epoch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        balancer = self._balancer(pl_module)
        balancer.before_step()
        if self.log_stats:
            stats = balancer.stats()
            if stats:
                pl_module.log_dict({f"balancer/{k}": v for k, v in stats.items()}, on_step=True)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint["equimodal_balancer"] = self._balancer(pl_module).state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if "equimodal_balancer" in checkpoint:
            self._balancer(pl_module).load_state_dict(checkpoint["equimodal_balancer"])
