"""Typed run configuration: YAML presets plus ``key=value`` overrides, checked against dataclasses.

A :class:`Config` has five sections: ``data``, ``views``, ``model``, ``method`` and ``train``.
Presets live in ``cdcl/presets/NAME.yaml`` (package data) and are found by name or by path.
Overrides such as ``train.epochs=1`` or ``views.global_scale=[0.75,0.9]`` are parsed with
``yaml.safe_load`` and type-checked against the field's annotation: unknown keys and ill-typed
values raise :class:`~cdcl.errors.ConfigError` naming the key, and ``0``/``false`` are honoured.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cdcl.data.views import ViewsConfig
from cdcl.errors import ConfigError
from cdcl.methods.base import MethodConfig
from cdcl.models.backbones import ModelConfig


@dataclass
class DataConfig:
    """Which dataset rows train the model."""

    path: str | None = None  # dataset directory (normally given as --data)
    split: int | None = None  # held-out-batch fold; None = the dataset's stored `split` column
    subset: str | None = None  # training-subset strategy (cdcl.data.splits.SUBSET_STRATEGIES)
    num_workers: int = 0  # DataLoader worker processes per training process


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (docs/design.md §5 'Common to all', §6)."""

    epochs: int = 200
    batch_size: int = 92  # per process
    lr: float = 7e-4  # absolute, not scaled by the batch size
    min_lr: float = 1e-5
    start_lr: float = 1e-5
    warmup_epochs: float = 10
    weight_decay: float = 4e-3
    weight_decay_end: float = 1e-2  # cosine; set equal to weight_decay for a constant one
    ema_momentum: float = 0.995
    ema_momentum_end: float = 0.9996
    freeze_last_layer_epochs: float = 1
    clip_grad: float | None = 3.0  # global grad-norm clip; None or 0 = off
    probe_lr: float = 1e-3
    probe_optimizer: Literal["adamw", "sgd"] = "adamw"
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 autocast on CUDA, off on CPU
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    max_steps: int | None = None  # stop after this many steps in total (tests, benchmarks)
    save_every_steps: int | None = None  # also checkpoint mid-epoch every N steps
    val_max_images: int | None = 4096  # cap on validation images per epoch (None = all)
    tensorboard: bool = False  # needs the optional `tensorboard` package


@dataclass
class Config:
    """A whole run's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), safe for YAML and for weights-only checkpoints."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (what `RUN/config.yaml` holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce_none(value: Any) -> None:
    if value is None:
        return None
    raise _Mismatch


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch


def _coerce_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Mismatch


def _coerce_float(value: Any) -> float:
    if _is_number(value):
        return float(value)
    if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _coerce_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)
    raise _Mismatch


# Annotation -> conversion of a plain value (checked by identity, in this order).
_SCALARS: tuple[tuple[Any, Callable[[Any], Any]], ...] = (
    (type(None), _coerce_none),
    (bool, _coerce_bool),
    (int, _coerce_int),
    (float, _coerce_float),
    (str, _coerce_str),
)


def _coerce_union(value: Any, args: tuple[Any, ...]) -> Any:
    """``value`` as the first member of the union that takes it (None only where allowed)."""
    if value is None:
        if type(None) in args:
            return None
        raise _Mismatch
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a)
        except _Mismatch:
            continue
    raise _Mismatch


def _coerce_sequence(value: Any, origin: Any, args: tuple[Any, ...]) -> list[Any] | tuple[Any, ...]:
    """A list or tuple of coerced items; a fixed-length tuple needs exactly its length."""
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    inner = args[0] if args else Any
    out = [_coerce(v, inner) for v in value]
    return tuple(out) if origin is tuple else out


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or _Mismatch."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args)
    if origin is Literal:
        if value in args:
            return value
        raise _Mismatch
    for scalar, convert in _SCALARS:
        if tp is scalar:
            return convert(value)
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, args)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if dataclasses.is_dataclass(tp) or isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation we do not model: accept as is


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    scope = f"in `{section}` " if section else ""
    return ConfigError(
        f"{where}: unknown config key `{key}`{hint}; valid keys {scope}are: {', '.join(valid)}"
    )


def _build_section(cls: type, values: dict[str, Any], section: str, where: str) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{section}.{key}"
        if key not in types_:
            raise _unknown_key(full, sorted(types_), where)
        try:
            kwargs[key] = _coerce(value, types_[key])
        except _Mismatch:
            raise ConfigError(
                f"{where}: `{full}` = {value!r}: expected {_type_name(types_[key])}"
            ) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: section `{section}`: {e}") from None


def config_from_dict(d: dict[str, Any] | None, where: str = "config") -> Config:
    """Build and type-check a Config from a nested dict (sections may be missing)."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)})")
    types_ = _field_types(Config)
    sections = {}
    for name, values in d.items():
        if name not in types_:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(
                f"{where}: unknown config section `{name}`{hint}; valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section `{name}` must be a mapping of keys to values")
        sections[name] = _build_section(types_[name], values, name, where)
    cfg = Config(**sections)
    _check_values(cfg, where)
    return cfg


def _check_values(cfg: Config, where: str) -> None:
    """Range checks the types cannot express."""
    t = cfg.train
    for key in ("epochs", "batch_size", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{where}: `train.{key}` = {getattr(t, key)}: must be at least 1")
    for key in ("max_steps", "save_every_steps", "val_max_images"):
        v = getattr(t, key)
        if v is not None and v < 1:
            raise ConfigError(f"{where}: `train.{key}` = {v}: must be at least 1, or null")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"{where}: `data.num_workers` = {cfg.data.num_workers}: must be >= 0")
    if hasattr(cfg.method, "resolved"):
        try:
            cfg.method.resolved()  # checks method.name
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------- presets and overrides


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    root = resources.files("cdcl") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(preset: str | Path) -> Path:
    """The YAML file of a preset given by name (``synthetic-cdcl``) or by path."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: preset file not found")
        return p
    candidate = resources.files("cdcl") / "presets" / f"{preset}.yaml"
    if not candidate.is_file():
        names = preset_names()
        close = difflib.get_close_matches(str(preset), names, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ConfigError(
            f"unknown preset `{preset}`{hint}; available: {', '.join(names)} (or pass a YAML path)"
        )
    return Path(str(candidate))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file; ConfigError naming the file when it is not one."""
    try:
        d = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return d


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def _is_str_like(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def parse_override(text: str) -> tuple[str, str, str]:
    """Split ``section.key=value`` into (section, key, raw value)."""
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected section.key=value (e.g. train.epochs=1)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(
            f"override `{text}`: the key must be section.key with a section among "
            f"{', '.join(SECTIONS)} (e.g. train.epochs=1)"
        )
    section, name = key.split(".")
    return section, name, raw


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of the nested dict ``d`` with ``key=value`` overrides applied (and type-checked)."""
    out = {k: dict(v or {}) for k, v in d.items()}
    types_ = _field_types(Config)
    for text in overrides:
        section, name, raw = parse_override(text)
        if section not in types_:
            raise ConfigError(
                f"override `{text}`: unknown config section `{section}`; valid sections: "
                f"{', '.join(SECTIONS)}"
            )
        ftypes = _field_types(types_[section])
        if name not in ftypes:
            raise _unknown_key(f"{section}.{name}", sorted(ftypes), "override")
        tp = ftypes[name]
        stripped = raw.strip()
        if _allows_none(tp) and stripped.lower() in ("none", "null", "~", ""):
            value: Any = None
        else:
            try:
                value = yaml.safe_load(raw) if stripped else ""
            except yaml.YAMLError:
                value = raw
            # A string field takes the text as written (`model.arch=18` stays "18", not 18).
            if _is_str_like(tp) and not isinstance(value, str) and value is not None:
                if not isinstance(value, list | dict):
                    value = raw
        out.setdefault(section, {})[name] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def read_preset(preset: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's nested dict, with ``extends: OTHER`` (a preset it builds on) merged in."""
    path = preset_path(preset)
    d = read_yaml(path)
    parent = d.pop("extends", None)
    if parent is None:
        return d
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must name one preset")
    if parent in _seen:
        raise ConfigError(f"{path}: `extends` cycle through {parent}")
    return _merge(read_preset(parent, (*_seen, str(preset))), d)


def load_config(
    preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """A Config from a preset (name or YAML path; None = defaults) plus ``key=value`` overrides."""
    base: dict[str, Any] = {}
    where = "defaults"
    if preset is not None:
        base = read_preset(preset)
        where = str(preset_path(preset)) if Path(str(preset)).exists() else f"preset {preset}"
        config_from_dict(base, where)  # report preset errors against the preset, not an override
    merged = apply_overrides(base, list(overrides))
    return config_from_dict(merged, where if not overrides else f"{where} + overrides")


def with_defaults(d: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """A stored configuration with the keys added to ``Config`` since it was written, at their
    defaults (as the version that wrote it behaved); unchanged when it no longer parses."""
    try:
        return config_from_dict(d, where).to_dict()
    except ConfigError:
        return d


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (``section.key``) whose values differ between two config dicts."""
    out = {}
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            va, vb = _plain(sa.get(key)), _plain(sb.get(key))
            if va != vb:
                out[f"{section}.{key}"] = (va, vb)
    return out
