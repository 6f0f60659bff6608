"""Plain data (parsed YAML or JSON) into typed, frozen dataclasses, field by field.

Job specs, evaluation suites and the records sdbatch writes are dataclasses. `from_data` builds one
from a mapping by its type annotations; a dataclass that checks itself calls `conform` in its
`__post_init__`, so one built in Python is held to the same rules as one read from a file. A bad
field raises `InputError` with one line that names it (``sweep.num_inference_steps[1]``) and says
what is allowed; a nested dataclass's own error gets its field's path in front.

The types a field may have are the ones these files need: bool, int, float, str, Literal, unions
with None, tuple[X, ...], dict[K, V], Any and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sdbatch.errors import InputError

T = TypeVar("T")


def from_data(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, converting each field by its type annotation.

    Args:
        where: the path of `data` in the file (``"sweep."``), put in front of every error.

    Raises:
        InputError: not a mapping, an unknown or missing field, or a field of the wrong type or
            out of its range.
    """
    if not isinstance(data, Mapping):
        raise InputError(f"{where.rstrip('.') or 'spec'}: must be a mapping of fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}{unknown[0]}: unknown field; allowed here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], f"{where}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{where}{name}: required field is missing")
    try:
        return cls(**values)
    except InputError as e:
        # the dataclass's own checks name its fields; the path to it is known here
        raise InputError(f"{where}{e}") from None


def conform(obj: Any) -> None:
    """Check a dataclass's fields against their annotations, in place: a list becomes a tuple, an
    int a float, a mapping the nested dataclass; anything else of the wrong type is an InputError.

    For `__post_init__` of frozen dataclasses: a value built in Python is checked like one read
    from a file.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        converted = _convert(hints[f.name], value, f.name)
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


def require(condition: bool, where: str, message: str) -> None:
    """Raise InputError("where: message") unless `condition` holds."""
    if not condition:
        raise InputError(f"{where}: {message}")


def known(values: tuple[str, ...], allowed: Iterable[str], where: str, what: str) -> None:
    """Each value listed once and one of `allowed`."""
    unique(values, where)
    allowed = list(allowed)
    for i, value in enumerate(values):
        require(
            value in allowed,
            f"{where}[{i}]",
            f"unknown {what} {value!r}; known: {', '.join(allowed)}",
        )


def unique(values: tuple, where: str) -> None:
    """At least one value, and none listed twice."""
    require(len(values) > 0, where, "must list at least one value")
    seen = set()
    for v in values:
        # Two equal values would make two identical configurations and duplicate every image.
        require(v not in seen, where, f"{v!r} is listed twice")
        seen.add(v)


def read_yaml(path: Path, what: str, example: str) -> dict[str, Any]:
    """The mapping a YAML file holds; its `name` defaults to the file's stem.

    Raises:
        InputError: the file is missing or unreadable, is not YAML, or is not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what}: cannot read {path}: {e}") from None
    try:
        # safe_load builds plain values only: nothing in a spec is ever evaluated as code.
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise InputError(f"{what}: {path} is not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must be a mapping of fields, like {example}")
    data.setdefault("name", path.stem)
    return data


def relative_to(location: str, base: Path) -> str:
    """A path written in a file, taken relative to the file's folder; URIs and absolute paths
    stay as they are."""
    if "://" in location or Path(location).expanduser().is_absolute():
        return location
    return str((base / location).resolve())


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value  # it checked itself when it was made
        return from_data(hint, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except InputError:
                pass
        raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: must be a mapping, got {value!r}")
        key, item = typing.get_args(hint)
        return {
            _convert(key, k, where): _convert(item, v, f"{where}.{k}") for k, v in value.items()
        }
    # bool is an int in Python; a YAML `yes` must not pass as a step count.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise InputError(f"{where}: must be {_describe(hint)}, got {value!r}")
    return float(value) if hint is float and not isinstance(value, float) else value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a mapping of fields"
    if origin is tuple:
        return "a list"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }[hint]
