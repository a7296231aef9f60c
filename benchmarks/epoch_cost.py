"""What an epoch- or data-level method costs, in epochs of joint training, measured side by side.

These methods cost whole extra passes (a per-sample inference pass over train, extra copies of samples, a
clustering diagnosis, boosted classifiers), not a slower step. This script trains each method and joint
training (``none``) for ``--epochs`` epochs on a task, in one process, one run after the other in an
order rotated each round, and reads each epoch's ``epoch_time`` from ``metrics.csv`` (from the epoch's
start, its epoch-level work included, to its last step; validation excluded). Every method is made active
from epoch 1 (its warm-up shortened, ``ACTIVE``), and the ratio is its mean epoch time over epochs 1..E-1
divided by ``none``'s in the same round: the cost of one *active* epoch in epochs of joint training. The
median over rounds is printed with the range, and for data plans the epoch's entries per training sample
(``bal_plan/entries`` over ``bal_plan/train_size``). A method that acts only every few epochs
(``relearning``: a diagnosis every 20 epochs, 3 at most) costs that much only in those epochs.

    python benchmarks/epoch_cost.py --task avdigits_hard --epochs 4 --rounds 3

Greedy needs a mid-fusion model, so it is compared with ``none`` on the same MMTM model (``none_mmtm``).
Absolute times depend on the machine and its load; the ratios of runs made side by side are what carries.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from equimodal.engine.config import load_config
from equimodal.engine.trainer import train

MMTM = ("model.fusion=mmtm", "model.fusion_options.gates=[2,3]")
ACTIVE: dict[str, tuple[str, ...]] = {
    "none": (),
    "multitask": (),
    "sample_valuation": ("balancer.options.start_epoch=1",),
    "modality_valuation": ("balancer.options.start_epoch=1",),
    "remix": ("balancer.options.warmup_epochs=1",),
    "relearning": ("balancer.options.first_reinit=1", "balancer.options.reinit_epoch=1",
                   "balancer.options.reinit_num=100"),
    "reconboost": (),
    "aug": (),
    "greedy": MMTM,
    "none_mmtm": MMTM,
}  # fmt: skip
"""Overrides that make each method act from epoch 1 (a diagnosis every epoch for ``relearning``)."""

REFERENCE = {"greedy": "none_mmtm"}


def epoch_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def active_epoch_time(rows: list[dict[str, str]]) -> float:
    """The mean ``epoch_time`` of every epoch after the first."""
    return statistics.fmean(float(r["epoch_time"]) for r in rows[1:])


def entries_per_sample(rows: list[dict[str, str]]) -> float | None:
    values = [
        float(r["bal_plan/entries"]) / float(r["bal_plan/train_size"])
        for r in rows
        if r.get("bal_plan/entries") not in (None, "", "nan")
        and r.get("bal_plan/train_size") not in (None, "")
    ]
    return statistics.fmean(values) if values else None


def run_once(task: str, label: str, epochs: int, folder: Path, extra: list[str]) -> list[dict[str, str]]:
    name = "none" if label == "none_mmtm" else label
    overrides = [
        f"balancer.name={name}", f"train.epochs={epochs}", "train.progress=false", "train.probe=false",
        "train.num_threads=1", *ACTIVE[label], *extra,
    ]  # fmt: skip
    cfg = load_config(task, overrides)
    out = folder / label
    train(cfg, out)
    return epoch_rows(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="avdigits_hard", help="a preset (default: avdigits_hard)")
    parser.add_argument(
        "--methods", default=",".join(ACTIVE), help="comma-separated, from: " + ", ".join(ACTIVE)
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    for needed in ("none", *(REFERENCE[m] for m in methods if m in REFERENCE)):
        if needed not in methods:
            methods.append(needed)
    times: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    entries: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        with tempfile.TemporaryDirectory() as tmp:
            for label in order:
                rows = run_once(args.task, label, args.epochs, Path(tmp), args.set)
                times[label].append(active_epoch_time(rows))
                size = entries_per_sample(rows)
                if size is not None:
                    entries[label].append(size)
        for label in methods:
            ratios[label].append(times[label][-1] / times[REFERENCE.get(label, "none")][-1])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(
        f"\n{args.task}, {args.epochs} epochs, {args.rounds} rounds; one active epoch in epochs of joint training"
    )
    print("| method | reference | cost (median [min, max]) | none's epoch (s, median) | entries per sample |")
    print("|---|---|---|---|---|")
    for label in methods:
        ref = REFERENCE.get(label, "none")
        r = ratios[label]
        size = f"{statistics.fmean(entries[label]):.2f}" if entries[label] else ""
        print(
            f"| `{label}` | `{ref}` | {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] | "
            f"{statistics.median(times[ref]):.3f} | {size} |"
        )


if __name__ == "__main__":
    main()
