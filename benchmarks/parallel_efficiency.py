"""Parallel efficiency of an experiment's runs on W local workers, and the driver's own cost per run.

For one set of N small mfeat runs (balancers x seeds, no reference rows) it measures, side by side in
one process, each into a fresh folder:

- ``direct``: the N runs trained one after the other by calling the task function itself
  (:func:`equimodal.experiments.executors.run_task`), with no driver: the training alone;
- ``compare --jobs W`` for each W: the wall time of the whole call (planning, the time estimate, the
  workers, the runs, the tables);
- ``collect``: the same compare again on the finished folder (planning and tables, nothing to train).

It prints, per W: the wall time, the efficiency ``T(jobs 1) / (W x T(jobs W))`` (1.0 is a perfect
speed-up; on a machine with fewer free cores than W it cannot reach 1), and the driver's overhead per
run ``(T(jobs 1) - T(direct)) / N``. Each is measured ``--repeat`` times, interleaved, and the fastest
kept. Absolute times vary on a shared machine; the ratios are measured in one run.

    python benchmarks/parallel_efficiency.py                 # 8 runs, W = 1, 2
    python benchmarks/parallel_efficiency.py --workers 1 2 4 --seeds 4 --epochs 5
    python benchmarks/parallel_efficiency.py --smoke         # 4 short runs (a check that it works)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from equimodal.experiments import compare  # noqa: E402
from equimodal.experiments.executors import Execution, RunTask, run_task  # noqa: E402
from equimodal.experiments.executors.base import available_cores  # noqa: E402
from equimodal.experiments.specs import run_dir, run_specs  # noqa: E402


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--balancers", default="none,amss", help="comma-separated balancers")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="the W to measure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--repeat", type=int, default=2, help="measure each this often, keep the fastest")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 1 epoch, once")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.repeat = 2, 1, 1
    if 1 not in args.workers:
        args.workers = [1, *args.workers]
    balancers = tuple(b.strip() for b in args.balancers.split(",") if b.strip())
    overrides = (f"train.epochs={args.epochs}", "train.probe=false", "train.progress=false",
                 f"train.num_threads={args.threads}")  # fmt: skip
    specs = run_specs(list(overrides), balancers, [], args.seeds, refs=False)
    n = len(specs)
    print(f"{n} runs ({', '.join(balancers)} x {args.seeds} seeds, {args.epochs} epochs of mfeat), "
          f"{args.threads} thread(s) per run, {available_cores()} cores available, pid {os.getpid()}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        def direct(folder: Path) -> None:
            for s in specs:
                task = RunTask(s.name, None, s.overrides, str(run_dir(folder, s)), threads=args.threads)
                report = run_task(task)
                assert report[1] == "done", report

        warm = specs[0]  # imports, the dataset's first load: paid once by this process, not by the runs
        run_task(RunTask("warm-up", None, warm.overrides, str(root / "warm"), threads=args.threads))
        kw = {"balancers": balancers, "seeds": args.seeds, "references": False, "overrides": overrides}
        t_direct, walls = float("inf"), dict.fromkeys(args.workers, float("inf"))
        for r in range(args.repeat):  # interleaved, the fastest of each kept: less noise from a busy host
            t_direct = min(t_direct, _timed(lambda r=r: direct(root / f"direct{r}")))
            for w in args.workers:
                ex = Execution(jobs=w, threads=args.threads)
                t = _timed(lambda w=w, r=r, ex=ex: compare(out=root / f"jobs{w}-{r}", execution=ex, **kw))
                walls[w] = min(walls[w], t)
        t_start = {w: _timed(lambda w=w: _start_workers(w)) for w in args.workers if w > 1}
        t_collect = _timed(lambda: compare(out=root / "jobs1-0", **kw))

    print()
    print("| workers W | wall s | efficiency T1 / (W x TW) |")
    print("|---|---|---|")
    for w in args.workers:
        print(f"| {w} | {walls[w]:.1f} | {walls[1] / (w * walls[w]):.2f} |")
    print()
    print(f"direct (task function, no driver): {t_direct:.1f} s for {n} runs")
    print(f"driver overhead per run (jobs 1 - direct) / N: {(walls[1] - t_direct) / n:.2f} s")
    print(f"collect (a rerun on the finished folder: planning and tables): {t_collect:.1f} s")
    for w, t in t_start.items():
        print(f"starting {w} worker processes and importing equimodal + torch in them: {t:.1f} s")


def _probe(_: int) -> int:
    import equimodal.engine.trainer  # noqa: F401 - what a worker imports before its first run

    return os.getpid()


def _start_workers(w: int) -> None:
    """W spawned workers that import the trainer and end: the fixed cost of the pool."""
    from equimodal.utils.interrupt import StopRequest
    from equimodal.utils.workers import Hooks, run_tasks

    hooks = Hooks(start=lambda i: None, done=lambda *a: None, say=print)
    run_tasks(_probe, list(range(w)), w, hooks, StopRequest())


if __name__ == "__main__":
    main()
