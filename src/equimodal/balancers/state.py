"""What a balancer declares, and what the base class does with it (the model: torchmetrics' ``add_state``).

A balancer declares two kinds of values, each kept as an attribute of the balancer (``self.<name>``):

- statistics (:meth:`~equimodal.Balancer.add_stat`): summed (or reduced otherwise) over the micro-batches
  of one optimizer step. The base class keeps them on the gradients' device, all-reduces them once per
  optimizer step over DDP ranks, in one flat collective per reduce op, before ``adjust_gradients``, and
  resets them to their default after the step;
- persistent state (:meth:`~equimodal.Balancer.add_state`): what lives across steps (running averages,
  counters, heads of the balancer's own, epoch-level results). The base class saves and restores it in
  ``state_dict``/``load_state_dict`` and, for tensors, keeps it on the gradients' device and undoes on the
  device (``torch.where``, no host read) what ``adjust_gradients`` changed in a non-finite step.

:class:`Declared` is that bookkeeping; the balancer calls it from its public calls.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..distributed import REDUCE_OPS, Reduce, all_reduce_flat, is_distributed

RESERVED = ("epoch", "num_steps", "epoch_set", "prepared_epoch", "generator")
"""Keys of the base class's own part of ``state_dict()``; no declared name may use them."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class Stat:
    """A declared statistic: its default (``None``: sized by the first value accumulated) and reduce op."""

    default: Tensor | None
    reduce: Reduce
    on_device: Tensor | None = None  # the default, copied once to the device the statistics live on


@dataclass
class State:
    """A declared persistent state: its default, whether a non-finite step is undone, and the hint given
    when a loaded ``state_dict`` lacks it."""

    default: Any
    rollback: bool
    missing: str


def is_module_like(value: object) -> bool:
    """Whether ``value`` saves itself (``state_dict``/``load_state_dict``, e.g. an ``nn.Module``)."""
    return not isinstance(value, Tensor) and all(
        callable(getattr(value, k, None)) for k in ("state_dict", "load_state_dict")
    )


class Declared:
    """The statistics and persistent state one balancer declared (their values live on the balancer)."""

    def __init__(self) -> None:
        self.stats: dict[str, Stat] = {}
        self.states: dict[str, State] = {}

    # ------------------------------------------------------------------ declaring
    def check_name(self, owner: object, name: str, default: object) -> None:
        """Raise unless ``name`` can hold a new declared value on ``owner``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"A declared statistic or state needs a Python identifier as name, found {name!r}."
            )
        if name in RESERVED:
            raise ValueError(f"{name!r} is a key of the base class's state_dict(); choose another name.")
        if name in self.stats or name in self.states:
            raise ValueError(
                f"{name!r} is declared twice; declare each statistic or state once, in __init__."
            )
        if hasattr(owner, name) and getattr(owner, name) is not default:
            raise ValueError(
                f"{name!r} is already an attribute of {type(owner).__name__}; a declared value is kept as "
                "`self.<name>`, so choose a name no attribute or method uses."
            )

    def add_stat(self, owner: object, name: str, default: Tensor | None, reduce: Reduce) -> None:
        """Declare statistic ``name`` (see :meth:`~equimodal.Balancer.add_stat`)."""
        self.check_name(owner, name, None)
        if reduce not in REDUCE_OPS:
            raise ValueError(f"reduce must be one of {REDUCE_OPS}, found {reduce!r}.")
        if default is not None and not isinstance(default, Tensor):
            raise TypeError(
                f"The default of statistic {name!r} must be a tensor or None, found {type(default).__name__}."
            )
        self.stats[name] = Stat(None if default is None else default.detach().clone(), reduce)
        setattr(owner, name, None if default is None else default.detach().clone())

    def add_state(self, owner: object, name: str, default: Any, rollback: bool, missing: str) -> None:
        """Declare persistent state ``name`` (see :meth:`~equimodal.Balancer.add_state`)."""
        self.check_name(owner, name, default)
        kept = default if is_module_like(default) else copy.deepcopy(default)
        self.states[name] = State(kept, bool(rollback), missing)
        setattr(owner, name, default if is_module_like(default) else copy.deepcopy(default))

    # ------------------------------------------------------------------ statistics
    def accumulate(self, owner: object, name: str, value: Tensor) -> None:
        """Add ``value`` to statistic ``name`` (a copy of it becomes the statistic when it is ``None``)."""
        if name not in self.stats:
            raise ValueError(
                f"{name!r} is not a declared statistic: call self.add_stat({name!r}, ...) in __init__."
            )
        current = getattr(owner, name)
        value = value.detach()
        if current is None:
            setattr(owner, name, value.clone())
        elif current.shape != value.shape:
            raise ValueError(
                f"Statistic {name!r} has shape {tuple(current.shape)}, found a value of shape "
                f"{tuple(value.shape)} in this micro-batch; every micro-batch must add the same shape."
            )
        else:
            current.add_(value.to(current.device))

    def reset_stats(self, owner: object, device: torch.device) -> None:
        """Every statistic back to its default, on ``device``."""
        for name, spec in self.stats.items():
            if spec.default is None:
                setattr(owner, name, None)
                continue
            if spec.on_device is None or spec.on_device.device != device:
                spec.on_device = spec.default.to(device)
            setattr(owner, name, spec.on_device.clone())

    def all_reduce(self, owner: object) -> None:
        """Reduce every statistic over DDP ranks: one flat collective per reduce op (and dtype)."""
        if not is_distributed():
            return
        groups: dict[tuple[str, torch.dtype, torch.device], list[str]] = {}
        for name, spec in self.stats.items():
            value = getattr(owner, name)
            if isinstance(value, Tensor):
                groups.setdefault((spec.reduce, value.dtype, value.device), []).append(name)
        for (reduce, _, _), names in groups.items():
            reduced = all_reduce_flat([getattr(owner, n) for n in names], reduce)  # type: ignore[arg-type]
            for n, value in zip(names, reduced, strict=True):
                setattr(owner, n, value)

    def stat_tensors(self, owner: object) -> list[Tensor]:
        """The floating-point statistics that hold a value (for the finiteness test)."""
        values = [getattr(owner, n) for n in self.stats]
        return [v for v in values if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]

    # ------------------------------------------------------------------ devices and non-finite steps
    def to(self, owner: object, device: torch.device) -> None:
        """Move every tensor statistic and tensor state to ``device`` (no copy when already there)."""
        for name in [*self.stats, *self.states]:
            value = getattr(owner, name)
            if isinstance(value, Tensor) and value.device != device:
                setattr(owner, name, value.to(device))

    def snapshot(self, owner: object) -> dict[str, Tensor]:
        """Copies of the tensor states a non-finite step must not change (taken before the step's edits)."""
        return {
            name: value.clone()
            for name, spec in self.states.items()
            if spec.rollback and isinstance(value := getattr(owner, name), Tensor)
        }

    def restore(self, owner: object, saved: Mapping[str, Tensor], finite: Tensor) -> None:
        """Each new value where ``finite`` holds, else its snapshot (``torch.where``: no host read)."""
        for name, old in saved.items():
            new = getattr(owner, name)
            if isinstance(new, Tensor) and new.shape == old.shape and new.device == old.device:
                setattr(owner, name, torch.where(finite.to(old.device), new, old))

    # ------------------------------------------------------------------ saving
    def save(self, owner: object) -> dict[str, Any]:
        """Every declared state as plain data (tensors copied to the CPU, module-like ones by state_dict)."""
        out: dict[str, Any] = {}
        for name in self.states:
            value = getattr(owner, name)
            if is_module_like(value):
                out[name] = {
                    k: v.detach().clone() if isinstance(v, Tensor) else v
                    for k, v in value.state_dict().items()
                }
            elif isinstance(value, Tensor):
                out[name] = value.detach().to("cpu", copy=True)
            else:
                out[name] = copy.deepcopy(value)
        return out

    def load(self, owner: object, state: Mapping[str, Any], balancer: str) -> None:
        """Restore what :meth:`save` returned (module-like states in place, tensors on their device)."""
        for name, spec in self.states.items():
            if name not in state:
                raise ValueError(
                    f"This {balancer} state has no {name!r} entry: it was saved by a balancer built with "
                    f"other options or by another version. {spec.missing}".rstrip()
                )
            saved, current = state[name], getattr(owner, name)
            if is_module_like(current):
                current.load_state_dict(saved)
            elif isinstance(current, Tensor) and saved is None and isinstance(spec.default, Tensor):
                setattr(owner, name, spec.default.to(current.device, copy=True))
            elif isinstance(current, Tensor):
                saved = torch.as_tensor(saved)
                declared = spec.default.shape if isinstance(spec.default, Tensor) else None
                if declared is not None and current.shape == declared and saved.shape != declared:
                    raise ValueError(
                        f"This {balancer} state's {name!r} has shape {tuple(saved.shape)}, expected "
                        f"{tuple(declared)}: it was saved by a balancer built with other options or by "
                        f"another version. {spec.missing}".rstrip()
                    )
                setattr(owner, name, saved.to(current.device, current.dtype, copy=True))
            else:
                setattr(owner, name, copy.deepcopy(saved))
