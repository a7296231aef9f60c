"""AMSS+'s bias-variance trade-off: the former weights (cap 10, no score floor) against the default (cap
100 over floored scores).

Prints, per spread of the unit gradients' log-normal squared norms and per update ratio k:

- bias: the fraction of the true gradient the cap removes in expectation (projection and norm of the
  lost vector), the Monte-Carlo ``lost_fraction`` of ``tests/amss/test_amss_reweight.py``, which
  asserts the 2 % bound for the default;
- error: the mean squared error of the masked, reweighted gradient, ``E||g_hat - g||^2 / ||g||^2``
  (bias squared plus variance; units are disjoint parameter blocks, so their gradients are orthogonal
  and the error is a sum over units of ``E[(w_j 1{j kept} - 1)^2] |g_j|^2``). Plain masking without
  reweighting (AMSS, biased by design) is printed beside it: the importance sampler keeps the large
  unit gradients, so its error is below the ``1 - k`` of keeping a uniform share.

docs/amss.md quotes this table. About 30 s on one core.

Run: ``python benchmarks/amss_reweight_bias.py``
"""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

TEST = Path(__file__).resolve().parents[1] / "tests" / "amss" / "test_amss_reweight.py"
TEST_FUNCTIONS = runpy.run_path(str(TEST))  # lost_fraction and sampled_masks, shared with the test


def relative_error(sigma: float, k: float, floor: float, cap: float | None) -> float:
    """``E||g_hat - g||^2 / ||g||^2`` of the masked gradient, weights ``min(1/pi_j, cap)`` (None: weight 1,
    plain masking), over the test's draws (``sampled_masks``: 32 x 64 unit gradients, 250 masks each)."""
    sq, keep, pi = TEST_FUNCTIONS["sampled_masks"](sigma, k, floor)
    weight = torch.ones_like(pi) if cap is None else (1.0 / pi).clamp(max=cap)
    kept = torch.where(keep, weight, torch.zeros_like(pi)).view(-1, *sq.shape)
    error = ((kept - 1.0) ** 2).mean(0)  # per unit, E[(w 1{kept} - 1)^2]
    return float(((error * sq).sum(1) / sq.sum(1)).mean())


def main() -> None:
    lost_fraction = TEST_FUNCTIONS["lost_fraction"]
    print("sigma | k   | bias (projection / norm lost)         | error E||g_hat - g||^2 / ||g||^2")
    print(
        "      |     | cap 10, no floor  | cap 100, floor 0.1 | cap 10, no floor | cap 100, floor 0.1 | AMSS"
    )
    for sigma in (1.0, 2.0, 3.0):
        for k in (0.1, 0.3, 0.5, 0.7, 0.9):
            old, new = lost_fraction(sigma, k, 0.0, 10.0), lost_fraction(sigma, k, 0.1, 100.0)
            err_old, err_new = relative_error(sigma, k, 0.0, 10.0), relative_error(sigma, k, 0.1, 100.0)
            plain = relative_error(sigma, k, 0.0, None)
            print(
                f"{sigma:5.1f} | {k:.1f} | {100 * old[0]:5.2f} % / {100 * old[1]:5.2f} % "
                f"| {100 * new[0]:5.3f} % / {100 * new[1]:5.3f} % "
                f"| {err_old:16.2f} | {err_new:18.2f} | {plain:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
