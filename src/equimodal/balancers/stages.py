"""Stages: a training schedule of phases, each a number of epochs with a name.

Methods that train in phases (a unimodal warm-up, then valuation or remixing; alternating modality
learners) declare a :class:`Schedule`; the current stage is a function of the epoch only, so a run
resumed mid-stage from ``last.pt`` (which restores the epoch) is in the same stage at the same point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One phase: ``name``, lasting ``epochs`` epochs (``None``: until the run ends; last stage only)."""

    name: str
    epochs: int | None


@dataclass(frozen=True)
class StageAt:
    """Where an epoch falls: the stage, its index, the epoch within it (0-based) and whether it begins."""

    stage: Stage
    index: int
    epoch_in_stage: int

    @property
    def first_epoch(self) -> bool:
        return self.epoch_in_stage == 0


class Schedule:
    """An ordered list of stages; :meth:`at` says which one an epoch is in.

    Raises:
        ValueError: no stages, a stage of fewer than 1 epoch, or an open-ended stage before the last.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("A schedule needs at least one stage.")
        for i, s in enumerate(self.stages):
            if s.epochs is None and i != len(self.stages) - 1:
                raise ValueError(f"Stage {s.name!r} has no end but is not the last stage.")
            if s.epochs is not None and s.epochs < 1:
                raise ValueError(f"Stage {s.name!r} must last at least 1 epoch, found {s.epochs}.")

    def at(self, epoch: int) -> StageAt:
        """The stage epoch ``epoch`` (0-based) falls in; past a finite schedule, its last stage."""
        start = 0
        for i, s in enumerate(self.stages):
            if s.epochs is None or epoch < start + s.epochs or i == len(self.stages) - 1:
                return StageAt(s, i, epoch - start)
            start += s.epochs
        raise AssertionError("unreachable")  # pragma: no cover

    def boundaries(self) -> list[int]:
        """The first epoch of every stage after the first."""
        out, start = [], 0
        for s in self.stages[:-1]:
            start += s.epochs or 0
            out.append(start)
        return out

    def describe(self) -> str:
        return ", ".join(f"{s.name} ({'rest' if s.epochs is None else s.epochs})" for s in self.stages)
