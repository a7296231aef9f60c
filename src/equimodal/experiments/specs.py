"""What an experiment trains: its runs (:class:`RunSpec`), their configs and their folders.

A comparison, a study and a diagnosis are each a list of runs. A run is a row label, the overrides that
define it and a seed; it lives in ``OUT/<label>/seed<k>`` (:func:`run_folder`) and is trained with the
config :func:`run_config` resolves, which is also what its summary records: a run is finished for an
experiment only when its summary holds exactly that config (:func:`finished_summary`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.run_folder import RunFolder

ADAM_OVERRIDES = ("optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0")
"""Joint training with Adam, a reference row of every comparison (``none_adam``)."""

Variant = tuple[str, tuple[str, ...]]
"""A named extra row of a comparison: ``(label, overrides)``."""


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: a row label, the overrides that define it, and a seed.

    Attributes:
        label: the row (and the folder ``OUT/<label>``); a study's labels hold slashes.
        overrides: ``section.key=value`` overrides of the config, the seed's among them.
        seed: the seed (``train.seed``), also the folder ``seed<k>``.
        config: a preset or YAML file of its own (a study's part); None: the experiment's.
    """

    label: str
    overrides: tuple[str, ...]
    seed: int
    config: str | None = None

    @property
    def name(self) -> str:
        """``<label>/seed<k>``, as the progress lines and errors name the run."""
        return f"{self.label}/seed{self.seed}"


def check_count(value: Any, name: str, meaning: str, example: str) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``--name``, what it means and an example."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"--{name} must be a whole number >= 1 ({meaning}), found {value!r}. Pass e.g. --{name} {example}."
        )
    return int(value)


def check_seeds(seeds: Any) -> int:
    """The number of seeds as an int >= 1 (see :func:`check_count`)."""
    return check_count(seeds, "seeds", "the number of seeds, run as 0..N-1", "3")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at each ``sep`` outside brackets, braces, parentheses and quotes, so a value may be a
    list or a mapping: ``a=1,b=[2,3]`` -> ``["a=1", "b=[2,3]"]``."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_variant(text: str) -> Variant:
    """``LABEL:key=value,key=value`` -> ``(LABEL, overrides)``; a named, fully specified extra row (a value
    may be a list or a mapping with commas of its own: ``gates=[2,3]``).

    Raises:
        ValueError: the text is not of that form (the message shows one).
    """
    label, sep, rest = text.partition(":")
    overrides = tuple(x.strip() for x in split_top_level(rest) if x.strip())
    if not sep or not label.strip() or not overrides or any("=" not in o for o in overrides):
        raise ValueError(
            f"--variant {text!r} must look like LABEL:key=value[,key=value...], e.g. "
            "amss_T1:balancer.name=amss,balancer.options.temperature=1.0"
        )
    return label.strip(), overrides


def run_specs(
    base: Sequence[str],
    balancers: Sequence[str],
    modalities: Sequence[str],
    seeds: int,
    refs: bool,
    variants: Sequence[Variant] = (),
) -> list[RunSpec]:
    """All runs of a comparison (methods, then variants, then the reference runs), seed by seed.

    Raises:
        ValueError: ``seeds`` is not a whole number >= 1.
    """
    check_seeds(seeds)
    specs: list[RunSpec] = []
    labels: list[Variant] = [(b, (f"balancer.name={b}",)) for b in balancers]
    labels += list(variants)
    if refs:
        if "none" not in balancers:
            labels.append(("none", ("balancer.name=none",)))
        labels.append(("none_adam", ("balancer.name=none", *ADAM_OVERRIDES)))
        labels += [
            (unimodal_run_label(m), ("balancer.name=unimodal", f"balancer.options.modality={m}"))
            for m in modalities
        ]
    for seed in range(seeds):
        for label, ov in labels:
            specs.append(RunSpec(label, (*base, *ov, f"train.seed={seed}"), seed))
    return specs


def run_dir(out: Path, spec: RunSpec) -> Path:
    """The folder of one run: ``OUT/<label>/seed<k>``."""
    return Path(out) / spec.label / f"seed{spec.seed}"


def run_dirs(out: Path, specs: Sequence[RunSpec]) -> dict[str, dict[int, Path]]:
    """Every run's folder, ``{label: {seed: OUT/<label>/seed<k>}}`` (the runs of a result object)."""
    found: dict[str, dict[int, Path]] = {}
    for s in specs:
        found.setdefault(s.label, {})[s.seed] = run_dir(out, s)
    return found


def run_folder(out: Path, spec: RunSpec) -> RunFolder:
    """The :class:`~equimodal.engine.run_folder.RunFolder` of one run (:func:`run_dir`)."""
    return RunFolder(run_dir(out, spec))


def run_config(config: str | None, spec: RunSpec) -> dict[str, Any]:
    """The resolved config a run of ``spec`` is trained with (as stored in its summary)."""
    from ..engine.config import config_to_dict, load_config

    source = spec.config if spec.config is not None else config
    return config_to_dict(load_config(source, [*spec.overrides, "train.progress=false"]))


def finished_summary(
    out: Path, spec: RunSpec, expected: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's summary if it finished (and, given ``expected``, was trained with that exact config).

    Raises:
        ValueError: the summary is truncated or damaged (naming it and the fix).
    """
    folder = run_folder(out, spec)
    if not folder.summary.exists():
        return None
    summary = folder.read_summary()
    if expected is not None and summary.get("config") != expected:
        return None
    return summary


def unimodal_run_label(modality: str) -> str:
    """The reference row of ``modality`` trained alone (``unimodal_<modality>``)."""
    return f"unimodal_{modality}"


def unimodal_run_dir(out: Path, modality: str, seed: int) -> Path:
    """The folder of the reference run of ``modality`` alone with ``seed``: ``OUT/unimodal_<m>/seed<k>``."""
    return Path(out) / unimodal_run_label(modality) / f"seed{seed}"


def fill_unimodal_runs(
    out: Path, specs: Sequence[RunSpec], config: str | None, modalities: Sequence[str], references: bool
) -> tuple[list[RunSpec], list[RunSpec]]:
    """The runs in two waves: those that need nothing first, then the runs whose balancer reads unimodal
    runs of its own seed (``Balancer.unimodal_runs_option``, UMT's ``teachers``) with that option set to
    the comparison's reference runs ``OUT/unimodal_<m>/seed<k>`` where the run does not set it itself.

    Raises:
        ValueError: such a run without the reference rows (``references=False``) and without the option.
    """
    from ..balancers import get_balancer_class

    first: list[RunSpec] = []
    second: list[RunSpec] = []
    for spec in specs:
        balancer = run_config(config, spec)["balancer"]
        option = get_balancer_class(balancer["name"]).unimodal_runs_option
        if option is None or balancer.get("options", {}).get(option) is not None:
            first.append(spec)
            continue
        if not references:
            raise ValueError(
                f"run {spec.name}: balancer {balancer['name']!r} reads unimodal runs of its own seed (option "
                f"{option!r}), which compare trains as its reference rows; drop --no-references, or set "
                f"balancer.options.{option} in the row's overrides."
            )
        folders = {m: str(unimodal_run_dir(out, m, spec.seed)) for m in modalities}
        value = json.dumps(folders)  # JSON is YAML: the override parser reads it as a mapping
        second.append(replace(spec, overrides=(*spec.overrides, f"balancer.options.{option}={value}")))
    return first, second
