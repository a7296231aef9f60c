"""``equimodal report RUN``: plot a run's learning curves from its ``metrics.csv``.

Three panels against the epoch: fused and per-modality (unimodal) validation accuracy, the training
loss, and the balancer's logged per-modality statistics (``bal_k/<m>``, ``bal_kept_grad_norm/<m>``,
... whatever the balancer reports). The selected epoch (best validation accuracy) is marked.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_metrics(run: Path) -> list[dict[str, float]]:
    """Rows of ``run/metrics.csv`` as floats (clear error when the folder is not a run folder)."""
    path = Path(run) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"No metrics.csv in {run}: expected a run folder written by `equimodal train --out DIR`."
        )
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the learning-curve figure (default ``RUN/curves.png``) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("equimodal report needs matplotlib: pip install 'equimodal[plots]'") from exc
    run = Path(run)
    rows = read_metrics(run)
    epochs = [r["epoch"] for r in rows]
    keys = list(rows[0])
    summary = run / "summary.json"
    chosen = json.loads(summary.read_text())["selected_epoch"] if summary.exists() else None
    bal_keys = [k for k in keys if k.startswith("bal_") and "/" in k]
    main = [k for k in bal_keys if k.startswith(("bal_k/", "bal_kept_grad_norm/"))]
    bal_keys = main or bal_keys[:8]  # AMSS: ratios and kept gradient norm; others: their first figures
    panels = 3 if bal_keys else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    acc_keys = ["val_acc"] + [k for k in keys if k.startswith("val_acc_")]
    for k in acc_keys:
        axes[0].plot(
            epochs,
            [100 * r.get(k, float("nan")) for r in rows],
            label=k.replace("val_acc_", "") if k != "val_acc" else "fused",
        )
    axes[0].set(title="validation accuracy (%)", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [r["train_loss"] for r in rows], color="k")
    axes[1].set(title="training loss", xlabel="epoch")
    if bal_keys:
        for k in bal_keys:
            axes[2].plot(epochs, [r.get(k, float("nan")) for r in rows], label=k[4:])
        axes[2].set(title="balancer statistics (epoch means)", xlabel="epoch")
        axes[2].legend(fontsize=7, loc="best")
    if chosen is not None:
        for ax in axes:
            ax.axvline(chosen, color="0.5", ls=":", lw=1)
    fig.tight_layout()
    target = Path(out) if out is not None else run / "curves.png"
    tmp = target.with_name(f".{target.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target
