"""Checkpoints of a run: ``last.pt`` (to resume) and ``best.pt`` (the epoch selected on validation).

Everything is written atomically by the main process; every process reads the same files to resume.

A checkpoint holds plain data only: tensors, Python numbers, strings, lists, tuples, dicts and ``None``
(:func:`plain_data` checks every saved part and turns numpy numbers into Python numbers). It is read with
``torch.load(weights_only=True)``, which builds no other object, so a run folder received from someone
else never runs code when it is resumed; a file holding anything else is refused (:class:`RunFolderError`).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_torch_save, plain_data
from .fitting import EpochState
from .run_folder import RunFolder, RunFolderError

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a run has done so far: one metrics row per epoch, the best epoch, the epoch times.

    Attributes:
        rows: the metrics row of every finished epoch.
        best: ``{"epoch", "val_acc", "val_loss"}`` of the epoch selected so far (``epoch = -1``: none).
        epoch_times: seconds of each finished epoch.
        next_epoch: the first epoch still to run.
        steps: optimizer steps of the finished epochs.
        step_rows: the balancer's statistics recorded every ``train.stats_every`` steps (``steps.csv``).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": -1, "val_acc": -math.inf, "val_loss": math.inf}
    )
    epoch_times: list[float] = field(default_factory=list)
    next_epoch: int = 0
    steps: int = 0
    step_rows: list[dict[str, Any]] = field(default_factory=list)

    def improves(self, val_acc: float, val_loss: float) -> bool:
        """Whether an epoch with these validation figures beats the best so far (accuracy, then loss)."""
        best = self.best
        return val_acc > best["val_acc"] or (val_acc == best["val_acc"] and val_loss < best["val_loss"])


class Checkpointer:
    """Saves and restores the training state of a run folder (``None``: keeps nothing on disk).

    Args:
        out: the run folder, or ``None``.
        config: the resolved config as a plain dict; a checkpoint written with another config is not
            resumed.
        main: whether this process writes (rank 0).
    """

    def __init__(self, out: Path | None, config: dict[str, Any], main: bool) -> None:
        self.out = out
        self.config = plain_data(config, "config")
        self.main = main
        self._best_in_memory: dict[str, Any] | None = None

    @property
    def last_path(self) -> Path | None:
        return None if self.out is None else RunFolder(self.out).last

    @property
    def best_path(self) -> Path | None:
        return None if self.out is None else RunFolder(self.out).best

    def _load(self, path: Path, device: torch.device) -> dict[str, Any]:
        """Read a checkpoint as data only (``weights_only=True``); a bad file is an error naming it and the fix.

        Refused: a file holding objects other than plain data (loading it could run code), a truncated or
        non-torch file, and a torch file that is not an equimodal checkpoint.
        """
        fix = "Pass --no-resume to start the run afresh (the folder's run is replaced), or --out another folder."
        try:
            ckpt = torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights only load failed" not in str(err).lower():
                raise RunFolderError(_unreadable(path, err, fix)) from None
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise RunFolderError(
                f"The checkpoint {str(path)!r} holds objects other than equimodal's"
                f"{f' (it refers to {found.group(1)})' if found else ''}; it is not loaded, as loading it could run code. "
                f"Equimodal's checkpoints hold only tensors, numbers, strings, lists and dicts. {fix}"
            ) from None
        except Exception as err:  # zipfile / EOF errors of a truncated or foreign file
            raise RunFolderError(_unreadable(path, err, fix)) from None
        if not isinstance(ckpt, dict) or "config" not in ckpt:
            raise RunFolderError(f"{str(path)!r} is not an equimodal checkpoint. {fix}")
        return ckpt

    def resume(self, parts: dict[str, Any], device: torch.device) -> tuple[Progress, EpochState | None]:
        """Load ``last.pt`` into ``parts`` (objects with ``load_state_dict``) when it fits this config.

        Returns the restored progress and, for a checkpoint written mid-epoch, that epoch's state (a
        fresh progress and ``None`` when there is nothing to resume).
        """
        path = self.last_path
        if path is None or not path.exists():
            return Progress(), None
        ckpt = self._load(path, device)
        if ckpt.get("config") != self.config:
            log.warning("Ignoring %s: it was written with another config", path)
            return Progress(), None
        try:
            for key, obj in parts.items():
                if obj is not None and ckpt.get(key) is not None:
                    obj.load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise RunFolderError(
                f"The checkpoint {str(path)!r} does not fit this run ({type(err).__name__}: {str(err)[:160]}). "
                "Pass --no-resume to start afresh, or --out another folder."
            ) from None
        torch.set_rng_state(ckpt["rng"].cpu())  # loaded onto the run's device with everything else
        partial = EpochState(**ckpt["partial"]) if ckpt.get("partial") else None
        next_epoch = ckpt["epoch"] if partial is not None else ckpt["epoch"] + 1
        log.info(
            "Resumed %s at epoch %d%s", self.out, next_epoch, f", step {partial.steps}" if partial else ""
        )
        progress = Progress(
            rows=ckpt["rows"], best=ckpt["best"], epoch_times=list(ckpt.get("epoch_times", [])), next_epoch=next_epoch,
            steps=int(ckpt.get("steps", 0)), step_rows=list(ckpt.get("step_rows", [])),
        )  # fmt: skip
        return progress, partial

    def save_last(
        self, parts: dict[str, Any], progress: Progress, epoch: int, partial: EpochState | None = None
    ) -> None:
        """Write ``last.pt``: every part's state, the progress and the RNG state.

        After a finished ``epoch`` (``partial=None``), or mid-way through ``epoch`` with its state.
        """
        if self.last_path is None or not self.main:
            return
        state = {key: (obj.state_dict() if obj is not None else None) for key, obj in parts.items()}
        state.update(
            rows=progress.rows, epoch_times=progress.epoch_times, best=progress.best, epoch=epoch,
            steps=progress.steps, step_rows=progress.step_rows,
            rng=torch.get_rng_state(), config=self.config,
            partial=None if partial is None else partial.to_dict(),
        )  # fmt: skip
        atomic_torch_save({k: plain_data(v, k) for k, v in state.items()}, self.last_path)

    def save_best(self, model: torch.nn.Module, balancer: Any, epoch: int) -> None:
        """Keep the selected epoch's model and balancer state (in memory, and in ``best.pt``)."""
        self._best_in_memory = {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "balancer": plain_data(balancer.state_dict(), "balancer"),
            "epoch": epoch,
        }  # what best.pt holds, so a resumed run restores the same selected epoch as this one
        if self.best_path is not None and self.main:
            atomic_torch_save({**self._best_in_memory, "config": self.config}, self.best_path)

    def load_best(self, model: torch.nn.Module, balancer: Any, device: torch.device) -> None:
        """Restore the selected epoch (from memory, or from ``best.pt`` after a resume)."""
        best = self._best_in_memory
        if best is None and self.best_path is not None and self.best_path.exists():
            best = self._load(self.best_path, device)
        if best is not None:
            model.load_state_dict(best["model"])
            balancer.load_state_dict(best["balancer"])


def _unreadable(path: Path, err: BaseException, fix: str) -> str:
    """The message for a checkpoint that cannot be read at all (truncated, or not a torch file)."""
    return (
        f"The checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {str(err)[:120]}); it may have "
        f"been cut off. {fix}"
    )
