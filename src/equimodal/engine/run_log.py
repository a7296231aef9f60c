"""What a run records besides ``metrics.csv``: ``steps.csv`` and, optionally, TensorBoard event files.

- ``steps.csv``: one row every ``train.stats_every`` optimizer steps with the global step, the epoch
  and the balancer's statistics of that step (``stats()``: AMSS's ``rho``/``k``/kept fraction per
  modality and per layer, OGM's coefficients, MMPareto's conflicts, ...). The rows live in the run's
  progress (so a resumed run keeps them) and the file is rewritten atomically after each epoch.
- TensorBoard (``train.tensorboard=true``, ``pip install 'equimodal[tensorboard]'``): every number of
  each ``metrics.csv`` row under ``epoch/`` (x-axis: the epoch) and every recorded step under
  ``step/`` (x-axis: the global step), in ``OUT/tensorboard``. Only the main process writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .run_folder import RunFolder

TENSORBOARD_INSTALL = "pip install 'equimodal[tensorboard]'"


def open_tensorboard(folder: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder``, or an ImportError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's module imports the tensorboard package
        raise ImportError(
            f"train.tensorboard=true needs the tensorboard package: {TENSORBOARD_INSTALL}"
        ) from err
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """Records a run's per-step statistics and mirrors rows to TensorBoard (see the module docstring).

    Args:
        out: the run folder (``None``: nothing is written; the rows are still kept in memory).
        every: record every this many optimizer steps (0: never).
        tensorboard: also write TensorBoard event files (needs ``out``).
        main: whether this process writes (rank 0).
    """

    def __init__(self, out: Path | None, *, every: int, tensorboard: bool, main: bool) -> None:
        self.folder = None if out is None else RunFolder(out)
        self.every, self.main = every, main
        self.writer = (
            open_tensorboard(self.folder.tensorboard)
            if tensorboard and self.folder is not None and main
            else None
        )

    def step(self, rows: list[dict[str, Any]], global_step: int, epoch: int, stats: dict[str, float]) -> None:
        """Record this optimizer step's statistics into ``rows`` when it is due."""
        if not self.every or global_step % self.every or not stats:
            return
        row = {"step": global_step, "epoch": epoch, **stats}
        rows.append(row)
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"step/{key}", value, global_step)

    def epoch(self, row: dict[str, Any], step_rows: list[dict[str, Any]]) -> None:
        """After an epoch: rewrite ``steps.csv`` and mirror the epoch's metrics row to TensorBoard."""
        if self.folder is None or not self.main:
            return
        if step_rows:
            self.folder.write_steps(step_rows)
        if self.writer is not None:
            epoch = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
