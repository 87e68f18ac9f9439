"""YAML files into frozen dataclasses, checked once at start-up (shared by the coordinator and the agent).

Every key must be a field of the dataclass; every value must have the field's type (ints are accepted
where floats are expected; a nested dataclass takes a mapping; Optional fields take null). An error
names the file, the key and what was expected.
"""
import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, Type, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file that cannot be used as it is."""


def load_yaml(cls: Type[T], path: Union[str, Path]) -> T:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_dict(cls, data, str(path))


def from_dict(cls: Type[T], data: Dict[str, Any], source: str = "config", prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a mapping, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(repr(prefix + k) for k in unknown)
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {names}; known keys: "
                          f"{', '.join(fields)}")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, source, prefix + name)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing key {prefix + name!r}")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return obj


def _convert(hint, value, source: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, key + ".")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value
