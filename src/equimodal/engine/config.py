"""Frozen-dataclass configuration: the source of truth; YAML files are presets.

Values read from YAML or ``--set a.b=value`` are coerced by the dataclass field's type (PyYAML reads
``1e-3`` as a string, for example). Unknown keys fail fast with close matches and the valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..registry import coerce_value, unknown_name_error


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, its options, batch sizes and how batches are loaded.

    ``batch_size`` is the global batch: under torchrun each of W processes takes ``batch_size / W``
    samples of it, so the updates do not depend on W. ``eval_batch_size`` is per process (it changes no
    result). ``num_workers``: ``DataLoader`` worker processes; ``-1`` picks 0 for in-memory datasets and
    ``min(8, CPUs - 1)`` for on-disk ones. ``pin_memory`` applies on CUDA only. ``drop_last``: drop the
    last, short training batch of each epoch (evaluation never drops one).
    """

    name: str = "mfeat"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = -1
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    drop_last: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Fusion head and optional encoder overrides (``{modality: {name: ..., **kwargs}}``); ``fusion=mmtm``
    builds mid fusion instead (MMTM gates between encoder stages, :mod:`equimodal.models.mmtm`)."""

    fusion: str = "concat"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer (sgd, adam, adamw) and learning-rate schedule (none, step, multistep, cosine).

    ``betas``: Adam/AdamW's ``(beta1, beta2)``; empty means torch's default ``(0.9, 0.999)``.
    ``lr``, ``weight_decay``, the rate a ``gamma`` above 1 reaches, and every float in the option
    mappings (balancer, data, fusion, encoders) are at most :data:`FLOAT_LIMIT` (1e30) in magnitude.
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = ()
    schedule: str = "none"
    step_size: int = 30
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1


@dataclass(frozen=True)
class BalancerConfig:
    """Registered balancer name and its keyword options."""

    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Epochs, seed, device and run-level switches.

    ``on_nonfinite``: ``"stop"`` (a non-finite loss or gradient ends the run with an error naming the
    epoch, the step and the modality) or ``"skip"`` (such steps are skipped and counted in metrics.csv as
    ``skipped_steps``; AMP overflow steps are always left to the GradScaler). ``checkpoint_every``: also
    write ``last.pt`` every N optimizer steps (0: at epoch ends only), so a long epoch resumes mid-way.
    ``log_every``: off a terminal, also log a line every N optimizer steps (0: one line per epoch).
    ``select_from``: the first epoch that model selection may choose (earlier epochs are validated and
    logged, never selected; the official NVGesture code evaluates from epoch 20).
    ``stats_every``: record the balancer's per-step statistics every N optimizer steps in ``steps.csv``
    (0: never). ``tensorboard``: also write every epoch row and recorded step to TensorBoard event
    files in ``OUT/tensorboard`` (``pip install 'equimodal[tensorboard]'``; needs ``--out``).
    """

    epochs: int = 40
    seed: int = 0
    device: str = "auto"
    grad_accum: int = 1
    amp: bool = False
    probe: bool = True
    progress: bool = True
    num_threads: int = 0
    on_nonfinite: str = "stop"
    checkpoint_every: int = 0
    log_every: int = 0
    select_from: int = 0
    stats_every: int = 1
    tensorboard: bool = False


@dataclass(frozen=True)
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
FLOAT_LIMIT = 1e30
"""The largest magnitude of a float option (rates, decays, balancer options): optimizers and balancers
apply them to float32 tensors after scaling them (Adam's bias correction divides the rate by
``1 - beta1**t``), so a value near float32's limit, 3.4e38, overflows into an error deep in torch."""
FLOAT_WHY = (
    "float32 arithmetic overflows beyond that once the value is scaled, e.g. by Adam's bias correction"
)

INT_LIMIT = 2**31
"""Integer fields (and the items of integer lists) are below this in magnitude."""


def _field_value(value: Any, tp: Any, where: str) -> Any:
    """A field's value: a section (a dataclass) from a mapping, anything else by
    :func:`~equimodal.registry.coerce_value`, with integers below :data:`INT_LIMIT` in magnitude."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where}: expected a mapping of options, found {type(value).__name__} {value!r}."
            )
        return _from_mapping(tp, value, where)  # type: ignore[arg-type]
    result = coerce_value(value, tp, where)
    items = result if isinstance(result, tuple) else (result,)
    if any(isinstance(i, int) and not isinstance(i, bool) and abs(i) >= INT_LIMIT for i in items):
        raise ValueError(f"{where}: expected an integer of magnitude below 2**31, found {value!r}.")
    return result


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_name_error(f"key in {where}" if where else "config key", str(key), names)
        kwargs[key] = _field_value(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested mappings, coercing values by field type, and validate it."""
    cfg = _from_mapping(Config, data or {}, "")
    validate_config(cfg)
    return cfg


def _check(ok: bool, where: str, expected: str, value: Any, fix: str = "") -> None:
    if not ok:
        raise ValueError(f"{where}: expected {expected}, found {value!r}.{' ' + fix if fix else ''}")


def _choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise unknown_name_error(kind, value, list(valid))


def validate_config(cfg: Config) -> None:
    """Check every value's range and choice before any work starts (names the key, the rule, the value).

    The sections are checked in order (data, optim, train), then the registered names and their
    options, then the range of every float option; the first rule broken is raised.

    Raises:
        ValueError: e.g. ``train.epochs: expected an integer >= 1, found 0.``
    """
    _check_data(cfg.data)
    _check_optim(cfg.optim, cfg.train.epochs)
    _check_train(cfg.train)
    _check(bool(cfg.balancer.name), "balancer.name", "a registered balancer name", cfg.balancer.name)
    _check(bool(cfg.data.name), "data.name", "a registered dataset name", cfg.data.name)
    check_registered(cfg)
    for where, options in (
        ("data.options", cfg.data.options),
        ("model.fusion_options", cfg.model.fusion_options),
        ("model.encoders", cfg.model.encoders),
        ("balancer.options", cfg.balancer.options),
    ):
        _check_float_range(where, options)


def _check_data(d: DataConfig) -> None:
    """Batch sizes, workers and prefetching."""
    _check(d.batch_size >= 1, "data.batch_size", "an integer >= 1", d.batch_size)
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", "an integer >= 1", d.eval_batch_size)
    _check(d.num_workers >= -1, "data.num_workers", "-1 (automatic) or an integer >= 0", d.num_workers)
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", "an integer >= 1", d.prefetch_factor)


def _check_optim(o: OptimConfig, epochs: int) -> None:
    """The optimizer, its rates and betas, and the schedule (whose peak rate depends on ``epochs``)."""
    _choice("optimizer (optim.name)", o.name, ("sgd", "adam", "adamw"))
    _check(
        math.isfinite(o.lr) and o.lr > 0,
        "optim.lr",
        "a finite number > 0",
        o.lr,
        "Try 0.01 (SGD) or 1e-3 (Adam).",
    )
    _check(
        o.lr <= FLOAT_LIMIT, "optim.lr", f"at most {FLOAT_LIMIT:.0e} ({FLOAT_WHY})", o.lr, "Try 0.01 (SGD)."
    )
    _check(0 <= o.momentum < 1, "optim.momentum", "a number in [0, 1)", o.momentum)
    two_betas = o.betas == () or (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas))
    _check(two_betas, "optim.betas", "two numbers in [0, 1) (or none: torch's default)", list(o.betas))
    _check(
        o.betas == () or o.name in ("adam", "adamw"),
        "optim.betas",
        "no betas with optim.name=sgd (they are Adam's)",
        list(o.betas),
        "Set optim.name=adam or adamw, or drop optim.betas.",
    )
    decay = o.weight_decay
    _check(math.isfinite(decay) and decay >= 0, "optim.weight_decay", "a finite number >= 0", decay)
    _check(
        decay <= FLOAT_LIMIT,
        "optim.weight_decay",
        f"at most {FLOAT_LIMIT:.0e} ({FLOAT_WHY})",
        decay,
        "Typical values: 1e-4 (SGD), 1e-2 (AdamW).",
    )
    _choice("schedule (optim.schedule)", o.schedule, ("none", "step", "multistep", "cosine"))
    _check(o.step_size >= 1, "optim.step_size", "an integer >= 1", o.step_size)
    _check(all(m >= 1 for m in o.milestones), "optim.milestones", "epochs >= 1", list(o.milestones))
    _check(math.isfinite(o.gamma) and o.gamma > 0, "optim.gamma", "a finite number > 0", o.gamma)
    _check_peak_lr(o, epochs)


def _check_train(t: TrainConfig) -> None:
    """Epochs, seed, device and the run-level switches."""
    _check(t.epochs >= 1, "train.epochs", "an integer >= 1", t.epochs)
    _check(t.seed >= 0, "train.seed", "an integer >= 0", t.seed)
    _check(
        bool(_DEVICE.fullmatch(t.device)),
        "train.device",
        "auto, cpu, cuda, cuda:N (a GPU's index) or mps",
        t.device,
        "Set e.g. train.device=auto (a GPU when present, else the CPU).",
    )
    _check(t.grad_accum >= 1, "train.grad_accum", "an integer >= 1", t.grad_accum)
    _check(t.num_threads >= 0, "train.num_threads", "0 (torch's default) or an integer >= 1", t.num_threads)
    _choice("train.on_nonfinite value", t.on_nonfinite, ("stop", "skip"))
    every = t.checkpoint_every
    _check(every >= 0, "train.checkpoint_every", "0 (epoch ends only) or an integer >= 1", every)
    _check(t.log_every >= 0, "train.log_every", "0 (one line per epoch) or an integer >= 1", t.log_every)
    _check(t.stats_every >= 0, "train.stats_every", "0 (no steps.csv) or an integer >= 1", t.stats_every)
    _check(
        0 <= t.select_from < t.epochs,
        "train.select_from",
        f"an epoch in 0..{t.epochs - 1} (train.epochs is {t.epochs})",
        t.select_from,
    )


def _scheduled_decays(o: OptimConfig, epochs: int) -> int:
    """How many times the schedule multiplies the learning rate by ``gamma`` within ``epochs`` epochs."""
    if o.schedule == "step":
        return (epochs - 1) // o.step_size
    if o.schedule == "multistep":
        return sum(1 for m in o.milestones if m < epochs)
    return 0


def _check_peak_lr(o: OptimConfig, epochs: int) -> None:
    """A ``gamma`` above 1 raises the learning rate at every decay: its peak must stay a float32."""
    decays = _scheduled_decays(o, epochs)
    if o.gamma <= 1 or not decays:
        return
    if math.log(o.lr) + decays * math.log(o.gamma) > math.log(FLOAT_LIMIT):
        raise ValueError(
            f"optim.gamma: expected a factor that keeps the learning rate at most {FLOAT_LIMIT:.0e} "
            f"({FLOAT_WHY}), found {o.gamma!r}: optim.lr={o.lr!r} times gamma**{decays} (the {decays} decays "
            f"of optim.schedule={o.schedule} in {epochs} epochs) is larger. A decay factor is below 1 (e.g. 0.1)."
        )


def _check_float_range(where: str, value: Any) -> None:
    """Every finite float option, however nested, within the float32 range (non-finite ones are left to
    the component, which names its own rule)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_float_range(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_float_range(f"{where}[{i}]", item)
    elif isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT_LIMIT:
        raise ValueError(
            f"{where}: expected a number of magnitude at most {FLOAT_LIMIT:.0e} ({FLOAT_WHY}), found "
            f"{value!r}. Pass a smaller value."
        )


def check_registered(cfg: Config) -> None:
    """The dataset, balancer, fusion and encoder names are registered and their options fit them.

    Checked by name and signature only (nothing is built or loaded), with the registries' messages:
    close matches for unknown names and options, the expected type for a mistyped value. A required
    option left out (a preset's data folder) is named when the dataset is loaded.
    """
    from ..balancers.registry import BALANCERS
    from ..data.registry import DATASETS
    from ..models.encoders import ENCODERS
    from ..models.fusion import FUSIONS
    from ..models.mmtm import MMTM_FUSION, MMTMClassifier
    from ..registry import check_options

    DATASETS.check(cfg.data.name, {"seed": cfg.train.seed, **cfg.data.options}, complete=False)
    options = dict(cfg.balancer.options)
    if "seed" in BALANCERS.options(cfg.balancer.name):
        options.setdefault("seed", cfg.train.seed)
    BALANCERS.check(cfg.balancer.name, options, complete=False)
    if cfg.model.fusion == MMTM_FUSION:
        check_options("Model fusion 'mmtm'", MMTMClassifier, cfg.model.fusion_options, skip=2, complete=False)
    else:
        FUSIONS.check(cfg.model.fusion, cfg.model.fusion_options, complete=False)
    for m, spec in cfg.model.encoders.items():
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise TypeError(f"model.encoders.{m} must be a mapping with a 'name' key, found {spec!r}.")
        ENCODERS.check(spec["name"], {k: v for k, v in spec.items() if k != "name"}, complete=False)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


PRESET_DIR = Path(__file__).parents[1] / "configs"
"""The presets not tied to one dataset (``amss_av.yaml``, ...) and the studies (``studies/``)."""
DATASET_DIR = Path(__file__).parents[1] / "data"
"""The built-in dataset folders: each holds its dataset's presets, ``data/<folder>/<preset>.yaml``."""


def preset_files() -> dict[str, Path]:
    """Every shipped preset by name: ``configs/*.yaml`` and each dataset folder's ``data/*/*.yaml``.

    Raises:
        ValueError: two preset files share a name (the name would be ambiguous).
    """
    found: dict[str, Path] = {}
    for path in sorted([*PRESET_DIR.glob("*.yaml"), *DATASET_DIR.glob("*/*.yaml")]):
        if path.stem in found:
            raise ValueError(
                f"Two presets are named {path.stem!r}: {found[path.stem]} and {path}. Rename one of them."
            )
        found[path.stem] = path
    return found


def preset_path(name: str | Path) -> Path | None:
    """The shipped preset named ``name``, or ``None`` when there is none."""
    return preset_files().get(str(name))


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(preset_files())


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error names the file, line and column (1-based)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: invalid YAML ({problem}). Fix the file's syntax.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) YAML file.") from None


def load_config(source: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML file (or a shipped preset by name), then apply ``key.path=value`` overrides.

    Every value is checked (types, ranges, choices) before anything runs; see :func:`validate_config`.
    """
    data: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"Config {str(source)!r} is a folder; pass a YAML file or a preset name.")
        if not path.exists():
            preset = preset_path(source)
            if preset is None:
                close = difflib.get_close_matches(str(source), list_presets(), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise FileNotFoundError(
                    f"Config {str(source)!r} is neither a file nor a shipped preset.{hint} "
                    f"Presets: {', '.join(list_presets())}."
                )
            path = preset
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, Mapping):
            raise TypeError(
                f"{path}: expected a YAML mapping at the top level, found {type(loaded).__name__}."
            )
        data = dict(loaded)
    for item in overrides:
        _set_path(data, item)
    return config_from_dict(data)


def resolve_recipe(config: str | None, dataset: str | None) -> tuple[str | None, list[str]]:
    """The config source and leading overrides for a command given ``--dataset`` and/or a ``CONFIG``.

    ``--dataset X`` alone runs X's shipped preset when there is one (the recipe ``equimodal train X``
    runs), else the default config with ``data.name=X``; with a ``CONFIG`` it runs that config with
    ``data.name=X``. Without ``--dataset`` it is ``CONFIG`` (or the default config) as given.
    """
    if dataset is None:
        return config, []
    if config is None and preset_path(dataset) is not None:
        return dataset, []
    return config, [f"data.name={dataset}"]


def describe_recipe(source: str | None, cfg: Config) -> str:
    """One line naming where a run's recipe comes from and its main figures (optimizer, batch, epochs)."""
    if source is None:
        origin = "the default config"
    elif preset_path(source) is not None and not Path(source).exists():
        origin = f"preset {source!r}"
    else:
        origin = repr(str(source))
    o = cfg.optim
    return (
        f"{origin}, data {cfg.data.name!r}: {o.name} lr {o.lr:g}, batch {cfg.data.batch_size}, "
        f"{cfg.train.epochs} epochs, {cfg.model.fusion} fusion"
    )


def _set_path(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like section.key=value (e.g. optim.lr=0.01).")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"Override {item!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"Override {item!r}: the value {raw!r} is not valid YAML ({problem}). Quote it to pass a string, "
            "e.g. key='\"text\"'."
        ) from None
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"Override {item!r}: {p!r} is a value, not a section.")
        node = nxt
    node[parts[-1]] = value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from ..utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
