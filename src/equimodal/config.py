"""Frozen-dataclass configuration: the source of truth; YAML files are presets.

Values read from YAML or ``--set a.b=value`` are coerced by the dataclass field's type (PyYAML reads
``1e-3`` as a string, for example). Unknown keys fail fast with close matches and the valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .registry import unknown_name_error


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, its options, batch sizes and how batches are loaded.

    ``batch_size`` is the global batch: under torchrun each of W processes takes ``batch_size / W``
    samples of it, so the updates do not depend on W. ``eval_batch_size`` is per process (it changes no
    result). ``num_workers``: ``DataLoader`` worker processes; ``-1`` picks 0 for in-memory datasets and
    ``min(8, CPUs - 1)`` for on-disk ones. ``pin_memory`` applies on CUDA only.
    """

    name: str = "mfeat"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = -1
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """Fusion head and optional encoder overrides (``{modality: {name: ..., **kwargs}}``)."""

    fusion: str = "concat"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer (sgd, adam, adamw) and learning-rate schedule (none, step, multistep, cosine)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
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
    """Epochs, seed, device and run-level switches."""

    epochs: int = 40
    seed: int = 0
    device: str = "auto"
    grad_accum: int = 1
    amp: bool = False
    probe: bool = True
    progress: bool = True
    num_threads: int = 0


@dataclass(frozen=True)
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numbers_in(value: Any) -> Any:
    """Free-form option values: turn number-like strings (YAML 1.1 reads ``1e-3`` as a string) into floats."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _numbers_in(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_in(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a clear error naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where}: expected a mapping of options, found {type(value).__name__} {value!r}."
            )
        return _from_mapping(tp, value, where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: expected a mapping, found {type(value).__name__} {value!r}.")
        return {k: _numbers_in(v) for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, found {type(value).__name__} {value!r}.")
        (elem, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, elem, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"{where}: expected true or false, found {value!r}.")
    if tp in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"{where}: expected a number, found the boolean {value!r}.")
        try:
            number = float(value) if isinstance(value, str) else value
            if tp is int:
                if float(number) != int(float(number)):
                    raise ValueError
                return int(float(number))
            return float(number)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"{where}: expected {tp.__name__}, found {value!r}.") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"{where}: expected a string, found {type(value).__name__} {value!r}.")
        return str(value)
    return value


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_name_error(f"key in {where}" if where else "config key", str(key), names)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from nested mappings, coercing values by field type."""
    return _from_mapping(Config, data or {}, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


PRESET_DIR = Path(__file__).parent / "configs"


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML file (or a shipped preset by name), then apply ``key.path=value`` overrides."""
    data: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if not path.exists():
            preset = PRESET_DIR / f"{source}.yaml"
            if not preset.exists():
                close = difflib.get_close_matches(str(source), list_presets(), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise FileNotFoundError(
                    f"Config {str(source)!r} is neither a file nor a shipped preset.{hint} "
                    f"Presets: {', '.join(list_presets())}."
                )
            path = preset
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise TypeError(
                f"{path}: expected a YAML mapping at the top level, found {type(loaded).__name__}."
            )
        data = dict(loaded)
    for item in overrides:
        _set_path(data, item)
    return config_from_dict(data)


def _set_path(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like section.key=value (e.g. optim.lr=0.01).")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"Override {item!r} has an empty key.")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"Override {item!r}: {p!r} is a value, not a section.")
        node = nxt
    node[parts[-1]] = value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
