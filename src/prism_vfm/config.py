"""Typed configuration: dataclasses, YAML files and ``key=value`` overrides, with errors that name the key.

Every stage has one dataclass (nested dataclasses for sections). A YAML file or an override may only set
fields that exist, with values of the field's type; anything else is a :class:`ConfigError` naming the
full dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml

from prism_vfm.errors import PrismError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")


class ConfigError(PrismError, ValueError):
    """A configuration key that does not exist or a value of the wrong type."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(cast("type[DataclassInstance]", tp), value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no decimal point) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys and wrong types raise ConfigError."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cast("type[DataclassInstance]", cls))}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown configuration key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain (YAML-serialisable) nested dict of a config dataclass."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` → ``("optim.lr", 1e-4)``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(config: T, overrides: Iterable[str | tuple[str, Any]]) -> T:
    """A copy of ``config`` with dotted-key overrides applied and type-checked."""
    data = to_dict(config)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(
                    f"unknown configuration key {'.'.join(parts[: depth + 1])} (in override {key})"
                )
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown configuration key {key}; valid keys here: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return from_dict(type(config), data)


def load_yaml(cls: type[T], path: str | Path, base: T | None = None) -> T:
    """Read a YAML file into ``cls``; keys absent from the file keep ``base``'s (or the defaults') values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"configuration file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a mapping of configuration keys at the top level")
    start = base if base is not None else cls()
    flat: list[tuple[str, Any]] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            field_is_section = isinstance(v, Mapping) and _is_section(cls, key)
            if field_is_section:
                walk(v, key + ".")
            else:
                flat.append((key, v))

    walk(data, "")
    try:
        return apply_overrides(start, flat)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _is_section(cls: type, dotted: str) -> bool:
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return False
        tp = _hints(cast(type, tp)).get(part)
        if tp is None:
            return False
    return dataclasses.is_dataclass(tp)


def save_yaml(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML (the file a run directory keeps next to its checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Unless ``ok``, a :class:`ConfigError` naming ``key``, what was ``expected`` and the ``value`` given."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def require_weights(key: str, value: str) -> None:
    """``value`` is ``"hub"``, ``"none"`` or an existing file or folder."""
    require(value in ("hub", "none") or Path(value).exists(), key, "'hub', 'none' or an existing path", value)
