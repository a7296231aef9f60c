"""The expected gradient AMSS+'s weight cap removes, former default against the current one.

Prints, per spread of the unit gradients' log-normal squared norms and per update ratio k, the fraction
of the true gradient lost in expectation (projection and norm of the lost vector) with a cap of 10 and
no score floor (the former default) and with a cap of 100 over floored scores (the default). The
Monte-Carlo itself is ``lost_fraction`` of ``tests/amss/test_amss_reweight.py``, which asserts the 2 %
bound; this script prints the table quoted in docs/amss.md. About 20 s on one core.

Run: ``python benchmarks/amss_reweight_bias.py``
"""

from __future__ import annotations

import runpy
from pathlib import Path

TEST = Path(__file__).resolve().parents[1] / "tests" / "amss" / "test_amss_reweight.py"


def main() -> None:
    lost_fraction = runpy.run_path(str(TEST))["lost_fraction"]
    print(
        "sigma | k   | cap 10, no floor: projection / norm lost | cap 100, floor 0.1: projection / norm lost"
    )
    for sigma in (1.0, 2.0, 3.0):
        for k in (0.1, 0.3, 0.5, 0.7, 0.9):
            old, new = lost_fraction(sigma, k, 0.0, 10.0), lost_fraction(sigma, k, 0.1, 100.0)
            print(
                f"{sigma:5.1f} | {k:.1f} | {100 * old[0]:6.2f} % / {100 * old[1]:6.2f} %"
                f"                    | {100 * new[0]:6.3f} % / {100 * new[1]:6.3f} %"
            )


if __name__ == "__main__":
    main()
