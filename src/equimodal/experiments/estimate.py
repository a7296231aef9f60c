"""How long an experiment's runs will take, said before the first one starts.

From the runs already finished in the output folder when there are any (their median time per epoch
times each missing run's epochs), else from a few optimizer steps and a validation pass of the first
missing run's config, timed in the driver as ``train`` would build it (:func:`timed_step`). An estimate
never fails the command: what cannot be estimated is said instead.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .specs import RunSpec, finished_summary


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``3.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def time_estimate(
    out: Path,
    specs: Sequence[RunSpec],
    todo: Sequence[RunSpec],
    expected: dict[RunSpec, dict[str, Any]],
    execution: tuple[int, int],
    how: str | None = None,
) -> str:
    """One line: how many runs are to train and about how long that takes; it never raises.

    From the finished runs in ``out`` when there are any (their median ``time_per_epoch`` x each
    missing run's epochs), else from a few timed optimizer steps of the first missing run's config
    (:func:`timed_step`); divided by the runs in parallel. ``execution`` is ``(runs at once, threads per
    run)``; ``how`` names the placement in the line (default ``--jobs N``).
    """
    jobs, threads = execution
    head = f"To train: {len(todo)} run(s) with {how or f'--jobs {jobs}'}"
    epochs = sum(int(expected[s]["train"]["epochs"]) for s in todo)
    try:
        finished = [finished_summary(out, s, expected[s]) for s in specs if s not in todo]
        per_epoch = [float(f["time_per_epoch"]) for f in finished if f is not None]
        per_epoch = [t for t in per_epoch if math.isfinite(t)]
        fixed = 0.0
        if per_epoch:
            per = statistics.median(per_epoch)
            basis = (
                f"the {len(per_epoch)} finished run(s) in {out}: {per:.2f} s per training epoch (median) x "
                "epochs; validation and start-up add to it"
            )
        else:
            cost = timed_step(expected[todo[0]], threads)
            per = cost.per_epoch
            basis = (
                f"timed steps of {todo[0].name}: {1e3 * cost.step:.0f} ms x {cost.steps} "
                f"steps and {cost.evaluation:.1f} s of validation per epoch, {cost.start:.1f} s to start, the "
                "same for every run"
            )
            fixed = (cost.start + 2 * cost.evaluation) * len(todo)  # start-up; the final val and test pass
    except Exception as exc:  # noqa: BLE001 - an estimate never fails the command
        return f"{head}; no time estimate ({type(exc).__name__}: {exc})."
    total = (per * epochs + fixed) / max(1, min(jobs, len(todo)))
    return f"{head}: about {duration(total)} (an estimate from {basis})."


@dataclass(frozen=True)
class RunCost:
    """What one run of a config costs, timed in the driver: seconds per optimizer step, steps per
    epoch, seconds of one validation pass, and seconds to load the data and build the run."""

    step: float
    steps: int
    evaluation: float
    start: float

    @property
    def per_epoch(self) -> float:
        return self.step * self.steps + self.evaluation


def timed_step(resolved: dict[str, Any], threads: int, steps: int = 3) -> RunCost:
    """What one run of a resolved config costs (see :class:`RunCost`), built as ``train`` builds it on
    its device: the median of up to ``steps`` optimizer steps after a warm-up one, within about 5 s, and
    one forward pass over a validation batch scaled to the split."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_steps(resolved, steps)
    finally:
        torch.set_num_threads(previous)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the runs, not this estimate, should hold the GPU's memory


def _time_steps(resolved: dict[str, Any], steps: int) -> RunCost:
    """Build a run's parts as ``train`` does and time its steps and its validation (see :func:`timed_step`)."""
    import torch

    from ..balancers import EpochData
    from ..data import load_dataset
    from ..data.base import make_loader
    from ..engine.config import config_from_dict
    from ..engine.trainer import build_optimizer, build_parts, seed_everything, select_device
    from ..testing import drive_step, start_epoch

    begin = time.perf_counter()
    cfg = config_from_dict(resolved)
    seed_everything(cfg.train.seed)
    ds = load_dataset(cfg.data.name, seed=cfg.train.seed, **cfg.data.options)
    device = select_device(cfg.train.device)
    model, balancer, _ = build_parts(cfg, ds, device)
    optimizer = build_optimizer(cfg, [*model.parameters(), *balancer.parameters()])
    loader = make_loader(ds.train, cfg.data.batch_size, train=True, seed=0)
    batch, y = next(iter(loader))
    batch, y = {k: v.to(device) for k, v in batch.items()}, y.to(device)
    one = [(batch, y)]
    start_epoch(balancer, 0, EpochData(train=lambda: iter(one), heldout=lambda: iter(one), device=device))
    start = time.perf_counter() - begin
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) <= steps and (not times or time.perf_counter() - begin < 5.0):
        tic = time.perf_counter()
        drive_step(balancer, model, batch, y, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
    val = make_loader(ds.val, cfg.data.eval_batch_size)
    inputs, _ = next(iter(val))
    tic = time.perf_counter()
    with torch.no_grad():
        model.eval()
        model({k: v.to(device) for k, v in inputs.items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    evaluation = (time.perf_counter() - tic) * len(val)
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return RunCost(step, len(loader), evaluation, start)
