"""Does gradient modulation survive an adaptive optimizer? A direct measurement of the mechanism.

OGM(-GE), AGM and MSLR act by multiplying a modality's gradients by a coefficient ``k``. Adam divides
each parameter's update by a running RMS of its own gradients, so a ``k`` that changes slowly between
steps should largely cancel. This script measures it: the same toy model, from the same
initialisation and on the same batches, is trained for ``--steps`` steps twice per method and
optimizer, once with the method's coefficient and once with the coefficient forced to 1 (the same
method with ``alpha = 1e-9``, or scales of 1 for MSLR, so every other part of the path, such as
OGM-GE's noise, is the same). The figure reported per modality is the ratio of the encoder's
parameter displacement ``||theta_N - theta_0||`` between the two runs, at several ``N``: about the
coefficient under SGD while training is still in its early, nearly linear phase, near 1 under Adam
if the effect cancels (later the slowed encoder catches up: both runs head for similar minima).
``mean k`` is the modality's coefficient averaged over the modulated run's steps (OGM: 1 on steps
where the modality is not dominant).

Setup: ``equimodal.testing.toy_model(2)`` (Conv1d + Linear encoders, concat fusion), 2048 samples of
``toy_batch`` in which modality m1 carries the label twice as strongly as m0 (so m1 dominates), batches
of 64 drawn in the same order for both runs; SGD lr 0.01 momentum 0.9, Adam lr 1e-3, no weight
decay (decay would move parameters whatever ``k`` is); AGM without its conditional clipping. Results
are averaged over ``--seeds`` initialisations.

Run:
    python benchmarks/adam_modulation.py                 # 3 seeds, N = 25, 100, 300 (about 20 s on 1 core)
    python benchmarks/adam_modulation.py --horizons 50 --seeds 1
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import equimodal as em
from equimodal.testing import toy_batch, toy_model

OFF = 1e-9  # alpha that makes every coefficient 1 to float precision, keeping the method's code path

# method name -> (balancer name, options with the coefficient, options with it forced to 1)
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mslr keep (m1 x0.5)": (
        "mslr",
        {"mode": "keep", "warmup_epochs": 0, "scales": {"m1": 0.5}},
        {"mode": "keep", "warmup_epochs": 0},
    ),
    "ogm (alpha 0.8)": ("ogm", {"alpha": 0.8}, {"alpha": OFF}),
    "ogm_ge (alpha 0.8)": ("ogm_ge", {"alpha": 0.8}, {"alpha": OFF}),
    "agm (alpha 1.5)": ("agm", {"alpha": 1.5, "clip": None}, {"alpha": OFF, "clip": None}),
}
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def encoder_vector(model: nn.Module, modality: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.encoders[modality].parameters()])


def run(
    balancer_name: str,
    options: dict[str, Any],
    optimizer: str,
    seed: int,
    horizons: list[int],
    batch_size: int,
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Train ``max(horizons)`` steps; returns the encoder displacements at each horizon and the mean k."""
    model = toy_model(2, seed=seed)
    data, labels = toy_batch(2, 2048, seed=1000 + seed)
    balancer = em.create_balancer(balancer_name, model, seed=seed, **options)
    balancer.set_epoch(0)
    opt = OPTIMIZERS[optimizer]([*model.parameters(), *balancer.parameters()])
    start = {m: encoder_vector(model, m) for m in balancer.modalities}
    order = torch.Generator().manual_seed(seed)
    ks: dict[str, list[float]] = {m: [] for m in balancer.modalities}
    moved: dict[int, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the Adam warning is what is measured here
        for step in range(1, max(horizons) + 1):
            idx = torch.randint(0, labels.shape[0], (batch_size,), generator=order)
            balancer.train_step({m: x[idx] for m, x in data.items()}, labels[idx], opt)
            stats = balancer.stats()
            for m in ks:
                ks[m].append(stats.get(f"k/{m}", stats.get(f"scale/{m}", 1.0)))
            if step in horizons:
                moved[step] = {m: float((encoder_vector(model, m) - start[m]).norm()) for m in ks}
    return moved, {m: statistics.fmean(v) for m, v in ks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[25, 100, 300])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    horizons = sorted(set(args.horizons))
    cols = "".join(f"{f'N={n} m0/m1':>17}" for n in horizons)
    header = f"{'method':<22}{'optim':<6}{'mean k m0/m1':>15}{cols}"
    print(
        f"displacement ratio ||theta_N - theta_0|| (with k) / (k = 1) per encoder, batch {args.batch_size}, "
        f"mean over {args.seeds} seeds; mean k over {horizons[-1]} steps"
    )
    print(header)
    print("-" * len(header))
    for label, (name, on, off) in METHODS.items():
        for optimizer in OPTIMIZERS:
            ratios = {n: {"m0": [], "m1": []} for n in horizons}
            means: dict[str, list[float]] = {"m0": [], "m1": []}
            for seed in range(args.seeds):
                moved, k = run(name, on, optimizer, seed, horizons, args.batch_size)
                ref, _ = run(name, off, optimizer, seed, horizons, args.batch_size)
                for m in means:
                    means[m].append(k[m])
                    for n in horizons:
                        ratios[n][m].append(moved[n][m] / ref[n][m])
            k_text = f"{statistics.fmean(means['m0']):.2f}/{statistics.fmean(means['m1']):.2f}"
            cells = "".join(
                f"{statistics.fmean(ratios[n]['m0']):>11.2f}/{statistics.fmean(ratios[n]['m1']):<5.2f}"
                for n in horizons
            )
            print(f"{label:<22}{optimizer:<6}{k_text:>15}{cells}")


if __name__ == "__main__":
    main()
