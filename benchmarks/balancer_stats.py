"""Average a balancer's logged per-step statistics (the ``bal_*`` columns of ``metrics.csv``) over runs.

For each label (a sub-folder of a ``compare`` output holding ``seed*/metrics.csv``) it prints every
``bal_*`` column averaged over epochs, then over seeds, plus the mean over the first ``--early``
epochs (``early/``), over the epochs where it is not zero (``nonzero/``: e.g. Remix's per-modality
sample counts while it remixes), its value in the last epoch (``last/``: e.g. AUG's classifier count at
the end) and in each epoch of ``--at-epochs`` (``epoch<e>/``: e.g. Relearning's strengths after its
diagnoses), the fraction of epochs whose training loss was not finite and the mean number of steps per
epoch dropped for non-finite values (runs with ``train.on_nonfinite=skip``). These are the mechanism
figures quoted in docs/results.md, e.g.:

    python benchmarks/balancer_stats.py runs/avdh amss amss_plus uniform_mask --keys k/,kept_grad_norm/,fallback
    python benchmarks/balancer_stats.py runs/i23_avdh relearning aug --keys strength/,classifiers/ --at-epochs 21,41
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np


def label_stats(folder: Path, early: int, at_epochs: tuple[int, ...] = ()) -> dict[str, float]:
    """Per-column mean over epochs then seeds (``early/<col>``: over the first ``early`` epochs;
    ``nonzero/<col>``: over the epochs where it is not zero; ``last/<col>``: the last epoch;
    ``epoch<e>/<col>``: epoch ``e``)."""
    per_seed: list[dict[str, float]] = []
    for path in sorted(folder.glob("seed*/metrics.csv")):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        cols = [c for c in rows[0] if c.startswith("bal_")]
        out = {}
        for c in cols:
            values = np.array([float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows])
            name = c[4:]
            out[name] = float(np.nanmean(values))
            out[f"early/{name}"] = float(np.nanmean(values[:early]))
            nonzero = values[np.nan_to_num(values) != 0]
            out[f"nonzero/{name}"] = float(nonzero.mean()) if nonzero.size else math.nan
            out[f"last/{name}"] = float(values[-1])
            for e in at_epochs:
                out[f"epoch{e}/{name}"] = float(values[e]) if e < len(values) else math.nan
        out["nonfinite_loss_epochs"] = float(
            np.mean([not math.isfinite(float(r["train_loss"])) for r in rows])
        )
        # with train.on_nonfinite=skip the non-finite steps are dropped and counted instead
        out["skipped_steps_per_epoch"] = float(np.mean([float(r.get("skipped_steps") or 0) for r in rows]))
        per_seed.append(out)
    if not per_seed:
        raise FileNotFoundError(
            f"No seed*/metrics.csv under {folder}: expected a compare output label folder."
        )
    keys = sorted(set().union(*per_seed))
    return {k: float(np.nanmean([s.get(k, math.nan) for s in per_seed])) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="a compare output folder")
    p.add_argument("labels", nargs="+", help="row labels (sub-folders) to summarise")
    p.add_argument(
        "--keys", default="", help="comma-separated prefixes of the statistics to print (default all)"
    )
    p.add_argument("--early", type=int, default=10, help="epochs in the early/ means")
    p.add_argument("--at-epochs", default="", help="comma-separated epochs whose values to print (epoch<e>/)")
    args = p.parse_args()
    prefixes = [k for k in args.keys.split(",") if k]
    at_epochs = tuple(int(e) for e in args.at_epochs.split(",") if e)
    for label in args.labels:
        stats = label_stats(args.root / label, args.early, at_epochs)
        shown = {
            k: v
            for k, v in stats.items()
            if not prefixes or any(k.split("/", 1)[-1].startswith(x) or k.startswith(x) for x in prefixes)
        }
        print(label)
        for k, v in shown.items():
            print(f"  {k:32s} {v:8.3f}")


if __name__ == "__main__":
    main()
