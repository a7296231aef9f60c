"""The SLURM parameters of ``--executor slurm``: ``--slurm KEY=VALUE`` flags over a ``--slurm-config``
YAML file, checked here (without submitit) so that a typo is named before anything is submitted."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SLURM_KEYS = {
    "cluster": "where submitit sends the jobs: slurm (default), local (this machine, to try a setup) or debug",
    "partition": "the SLURM partition (sbatch --partition)",
    "account": "the account charged (sbatch --account)",
    "qos": "the quality of service (sbatch --qos)",
    "time": "the time limit of each run's job, in minutes (sbatch --time)",
    "mem_gb": "the memory of each run's job, in GB (sbatch --mem)",
    "cpus_per_task": "the CPUs of each run's job (default: --threads x --gpus-per-run)",
    "gpus_per_node": "the GPUs of each run's job (default: --gpus-per-run on a GPU config, else none)",
    "array_parallelism": "how many runs of the job array run at once (sbatch --array=...%N)",
    "constraint": "a node feature constraint (sbatch --constraint)",
    "exclude": "nodes to avoid (sbatch --exclude)",
    "setup": "shell lines run before each job, separated by ';' (module load ..., source venv/bin/activate)",
    "folder": "where submitit keeps its job files (default: OUT/.submitit)",
}
"""Every key ``--slurm`` takes, with what it means."""


def slurm_options(config: str | Path | None, flags: Sequence[str]) -> dict[str, Any]:
    """The SLURM parameters: the YAML mapping in ``config`` (if any), then each ``KEY=VALUE`` of
    ``flags`` (values read as YAML scalars: ``time=120`` is a number).

    Raises:
        ValueError: a flag without ``=``, an unknown key (with close matches and the known keys), or a
            config file that is not a mapping. FileNotFoundError: no such config file.
    """
    import yaml

    options: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(
                f"--slurm-config {str(path)!r}: no such file; pass a YAML file of SLURM keys."
            )
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"--slurm-config {str(path)!r} must hold a mapping such as 'partition: gpu', found "
                f"{type(data).__name__}."
            )
        data = data.get("slurm", data) if isinstance(data.get("slurm"), dict) else data
        options.update({str(k): v for k, v in data.items()})
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm {flag!r} must look like KEY=VALUE, e.g. --slurm partition=gpu")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    for key in options:
        if key not in SLURM_KEYS:
            import difflib

            close = difflib.get_close_matches(key, list(SLURM_KEYS), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"--slurm: unknown key {key!r}.{hint} Known keys: {', '.join(SLURM_KEYS)} (see "
                "`equimodal compare --help`)."
            )
    return options
