"""Re-initialisation: pulling an encoder's weights back towards their initial values.

Diagnosing & Re-learning (Wei et al., ECCV 2024) softly resets each encoder at the start of an epoch:
``w <- (1 - a) w + a w0`` with ``w0`` the encoder's weights at initialisation and ``a`` its
re-initialisation strength. Two things the authors' code leaves untouched are named options here:

- ``optimizer_state``: ``"keep"`` (the authors': momentum or Adam moments of the re-initialised weights
  carry on) or ``"reset"`` (the optimizer state of those parameters is dropped, as for fresh weights,
  and rebuilt by the optimizer at its next step);
- ``batchnorm``: ``"keep"`` (the authors': running mean and variance stay as trained) or ``"blend"`` (they
  are pulled towards their initial values by the same strength, as the weights are).

:class:`InitialWeights` keeps a CPU copy of every parameter and BatchNorm statistic of the chosen
modules, taken once at construction; a balancer saves it in its state (a resumed run pulls towards the
same ``w0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

OptimizerState = Literal["keep", "reset"]
BatchNormMode = Literal["keep", "blend"]


class InitialWeights:
    """CPU copies of some modules' parameters and floating buffers at construction, by module name.

    A ``state_dict``/``load_state_dict`` pair so that :meth:`~equimodal.Balancer.add_state` saves it.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.values: dict[str, dict[str, Tensor]] = {
            name: {
                k: v.detach().to("cpu", copy=True)
                for k, v in module.state_dict().items()
                if v.is_floating_point()
            }
            for name, module in modules.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: {k: v.clone() for k, v in d.items()} for name, d in self.values.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = {name: {k: v.clone() for k, v in d.items()} for name, d in state.items()}


@torch.no_grad()
def reinitialise(
    name: str,
    module: nn.Module,
    initial: InitialWeights,
    strength: float,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: OptimizerState = "keep",
    batchnorm: BatchNormMode = "keep",
) -> int:
    """``w <- (1 - strength) w + strength w0`` for every trainable parameter of ``module``; returns how many
    tensors were changed.

    Args:
        name: the module's key in ``initial``.
        module: the module (an encoder).
        initial: its weights at construction.
        strength: in [0, 1]; 0 changes nothing (and returns 0).
        optimizer: the run's optimizer, needed for ``optimizer_state="reset"``.
        optimizer_state: ``"keep"`` or ``"reset"`` (see the module docstring).
        batchnorm: ``"keep"`` or ``"blend"`` the running statistics.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"re-initialisation strength must be in [0, 1], found {strength}.")
    if optimizer_state not in ("keep", "reset"):
        raise ValueError(f"optimizer_state must be 'keep' or 'reset', found {optimizer_state!r}.")
    if batchnorm not in ("keep", "blend"):
        raise ValueError(f"batchnorm must be 'keep' or 'blend', found {batchnorm!r}.")
    if strength == 0.0:
        return 0
    if optimizer_state == "reset" and optimizer is None:
        raise ValueError("optimizer_state='reset' needs the optimizer whose state to drop.")
    w0 = initial.values[name]
    changed = 0
    for key, p in module.named_parameters():
        if not p.requires_grad or key not in w0:
            continue
        p.lerp_(w0[key].to(p.device, p.dtype), strength)
        changed += 1
        if optimizer_state == "reset" and optimizer is not None:
            optimizer.state.pop(p, None)
    if batchnorm == "blend":
        for key, b in module.named_buffers():
            if key in w0 and b.is_floating_point():
                b.lerp_(w0[key].to(b.device, b.dtype), strength)
                changed += 1
    return changed
