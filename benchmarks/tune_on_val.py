"""Grid search on the validation split only: mean val accuracy of each setting over seeds.

Example (the AMSS tuning reported in docs/results.md):

    python benchmarks/tune_on_val.py avdigits_hard --balancers none,amss,amss_plus,uniform_mask \
        --grid balancer.options.temperature=0.05,0.2,1.0 --grid optim.lr=0.01,0.02 --seeds 3 --out runs/tune

Runs are resumable (finished ones are skipped). Test metrics are never read: the selection uses
``summary.json``'s ``val`` block only. A grid key under ``balancer.options`` is applied only to
balancers that accept it.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np

from equimodal.balancers import get_balancer_class
from equimodal.experiments.execution import run_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file or preset")
    p.add_argument("--balancers", required=True)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/tune")
    args = p.parse_args()
    grid = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in args.grid)]
    jobs, settings = [], {}
    for bal in args.balancers.split(","):
        accepted = inspect.signature(get_balancer_class(bal).__init__).parameters
        keys = [
            (k, vs) for k, vs in grid if not k.startswith("balancer.options.") or k.split(".")[-1] in accepted
        ]
        for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in keys]):
            label = bal + "".join(f"__{k.split('.')[-1]}={v}" for k, v in combo)
            ov = (*args.set, f"balancer.name={bal}", *[f"{k}={v}" for k, v in combo])
            settings[label] = []
            for seed in range(args.seeds):
                out = Path(args.out) / label / f"seed{seed}"
                settings[label].append(out)
                if not (out / "summary.json").exists():
                    jobs.append((args.config, (*ov, f"train.seed={seed}"), str(out), 1))
    print(f"{len(jobs)} runs to do")
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for done, err in pool.imap_unordered(run_one, jobs):
                print(done, err or "")
    else:
        for job in jobs:
            print(*run_one(job))
    rows = []
    for label, outs in settings.items():
        vals = [
            json.loads((o / "summary.json").read_text())["val"]["val_acc"]
            for o in outs
            if (o / "summary.json").exists()
        ]
        if vals:
            rows.append((float(np.mean(vals)), float(np.std(vals)), len(vals), label))
    print("\nval accuracy (mean ± std over seeds), best first:")
    for mean, std, n, label in sorted(rows, reverse=True):
        print(f"  {100 * mean:6.2f} ± {100 * std:4.2f}  (n={n})  {label}")


if __name__ == "__main__":
    main()
