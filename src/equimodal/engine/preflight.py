"""What a command that trains many runs checks before its first one.

``compare``, ``study`` and ``diagnose`` build every distinct run once before training any (the dataset
loaded once per data config, the model and its balancer on the CPU, the device and the optional packages
the run needs), so that a wrong value or a missing package stops the command at once, naming the run,
instead of failing run after run an hour later. Runs that differ only by seed are built once: a seed
changes what is drawn, not what can be built.

The figures of these commands need matplotlib; without it they still write every table, and
:func:`figures_missing` gives the line they print before the first run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOTS_INSTALL = "pip install 'equimodal[plots]'"


class PreflightError(ValueError):
    """A run of a command cannot start (a value, a file or a package it needs); nothing was trained."""


def _key(config: Mapping[str, Any], *sections: str) -> str:
    """A hashable key of a config dict: the given sections (all when none), the seed left out."""
    picked = {k: v for k, v in config.items() if not sections or k in sections}
    if "train" in picked:
        picked["train"] = {k: v for k, v in picked["train"].items() if k != "seed"}
    return json.dumps(picked, sort_keys=True, default=str)


def check_runs(configs: Mapping[str, Mapping[str, Any]]) -> int:
    """Build every distinct run of ``configs`` (``{run name: resolved config dict}``) once.

    Returns the number of distinct runs built.

    Raises:
        PreflightError: a run that cannot start, named, with the reason and its fix.
    """
    import torch

    from ..data import load_dataset
    from .config import config_from_dict
    from .trainer import build_parts, check_balancer_fits, check_run_options, select_device

    datasets: dict[str, Any] = {}
    built: set[str] = set()
    for name, plain in configs.items():
        key = _key(plain)
        if key in built:
            continue
        built.add(key)
        try:
            cfg = config_from_dict(plain)
            device = select_device(cfg.train.device)
            check_run_options(cfg, out=Path("."))  # the drivers always give a run its folder
            data_key = _key(plain, "data")
            if data_key not in datasets:
                datasets[data_key] = load_dataset(cfg.data.name, seed=cfg.train.seed, **cfg.data.options)
            # built on the CPU: the check must not take GPU memory from the runs themselves
            _, balancer, _ = build_parts(cfg, datasets[data_key], torch.device("cpu"))
            check_balancer_fits(cfg, balancer, cfg.train.amp and device.type == "cuda")
        except (ValueError, TypeError, OSError, ImportError) as err:
            raise PreflightError(
                f"Run {name} cannot start: {err} Nothing was trained; fix this and rerun the command."
            ) from err
    log.info("Checked %d distinct run(s) before training", len(built))
    return len(built)


def figures_missing() -> str | None:
    """The line to print when matplotlib is missing (figures are skipped, tables written), else None."""
    if importlib.util.find_spec("matplotlib") is not None:
        return None
    return f"matplotlib is not installed: the figures will be skipped, the tables written ({PLOTS_INSTALL})."
