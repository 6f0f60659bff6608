"""Plain data (parsed YAML or JSON) into typed, frozen dataclasses, field by field.

Job specs, evaluation suites and the records sdbatch writes are dataclasses. `from_data` builds one
from a mapping by its type annotations; a dataclass that checks itself calls `conform` in its
`__post_init__`, so one built in Python is held to the same rules as one read from a file. A bad
field raises `InputError` with one line that names it (``sweep.num_inference_steps[1]``) and says
what is allowed; a nested dataclass's own error gets its field's path in front.

The types a field may have are the ones these files need: bool, int, float, str, Literal, unions
with None, tuple[X, ...], dict[K, V], Any and nested dataclasses.

A YAML file costs at most what its size says: `read_yaml` refuses one over `MAX_YAML_BYTES`,
nested deeper than `MAX_YAML_DEPTH`, with more than `MAX_YAML_ALIASES` aliases, or whose aliases
expand to more than `MAX_YAML_NODES` values (the "billion laughs"), before any Python value is
built; an error quotes any value `shown`, cut short.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sdbatch.errors import InputError, first_line

T = TypeVar("T")

# A spec or a suite is a few hundred values in a few KB; these bounds are far above any real one
# and far below what would take a second to read.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 10_000
# Python refuses to read an int of over 4,300 digits (a ValueError, not a YAML error); no field
# needs more than 19.
MAX_YAML_DIGITS = 100
MAX_NAME = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


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
    # in the file's order: keys of mixed types (1, null, "a") do not sort
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise InputError(
            f"{where}{_key(unknown[0])}: unknown field{nearest(unknown[0], fields)}; "
            f"allowed here: {', '.join(fields)}"
        )
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


def within(value: float, low: float, high: float, where: str, why: str = "") -> None:
    """`low <= value <= high` (so never NaN), else an error that states the range and why."""
    reason = f" ({why})" if why else ""
    require(
        low <= value <= high,
        where,
        f"must be between {low:,} and {high:,}{reason}, got {shown(value)}",
    )


def file_name(value: str, where: str) -> None:
    """A label that names files: it can only ever name one file inside the folder it is put in."""
    require(
        len(value) <= MAX_NAME and _NAME.fullmatch(value) is not None,
        where,
        f"must be 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.' or '-' "
        f"(it names files), got {shown(value)}",
    )


def shown(value: Any) -> str:
    """repr(value) in at most about 60 characters, however large the value: to quote in errors."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else f"{text[:50]}...{text[-7:]}"


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int of over 4,300 digits raises instead
        if x.bit_length() > 256:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel = 2
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 50
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 4


def _key(key: Any) -> str:
    """A field name as the user wrote it, or quoted and cut when it is odd or long."""
    plain = isinstance(key, str) and 0 < len(key) <= 60 and key.isprintable() and key.strip() == key
    return key if plain else shown(key)


def nearest(value: Any, allowed: Iterable[str]) -> str:
    """A hint naming the allowed name closest to a misspelt `value`; empty when none is close."""
    near = difflib.get_close_matches(value, list(allowed), n=1) if isinstance(value, str) else []
    return f" (did you mean {near[0]}?)" if near else ""


def known(values: tuple[str, ...], allowed: Iterable[str], where: str, what: str) -> None:
    """Each value listed once and one of `allowed`."""
    unique(values, where)
    allowed = list(allowed)
    for i, value in enumerate(values):
        require(
            value in allowed,
            f"{where}[{i}]",
            f"unknown {what} {shown(value)}{nearest(value, allowed)}; known: {', '.join(allowed)}",
        )


def unique(values: tuple, where: str) -> None:
    """At least one value, and none listed twice."""
    require(len(values) > 0, where, "must list at least one value")
    seen = set()
    for v in values:
        # Two equal values would make two identical configurations and duplicate every image.
        require(v not in seen, where, f"{shown(v)} is listed twice")
        seen.add(v)


def read_yaml(path: Path, what: str, example: str) -> dict[str, Any]:
    """The mapping a YAML file holds; its `name` defaults to the file's stem.

    Raises:
        InputError: the file is missing, unreadable, not a regular file, over the bounds above,
            not YAML, or not a mapping.
    """
    try:
        # a FIFO or /dev/zero would never end: only a regular file is read, and only so far
        if not stat.S_ISREG(path.stat().st_mode):
            raise InputError(f"{what}: {path} is not a file")
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise InputError(f"{what}: cannot read {path}: {first_line(e)}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise InputError(
            f"{what}: {path} is over {MAX_YAML_BYTES // 1024} KiB; like {example}, a "
            f"{what} is a short file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what}: {path} is not UTF-8 text") from None
    try:
        # SafeConstructor builds plain values only: nothing in a spec is ever evaluated as code.
        data = yaml.load(text, Loader=_BoundedLoader)
    except _TooCostly as e:
        raise InputError(f"{what}: {path} {e.problem}{_line(e)}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{what}: {path} is not valid YAML{_line(e)}{_reason(e)}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must be a mapping of fields, like {example}")
    data.setdefault("name", path.stem)
    return data


def _line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f" (line {mark.line + 1})" if mark else ""


def _reason(error: yaml.YAMLError) -> str:
    """The parser's problem, and what it was reading where that began: an unclosed bracket is
    found lines after the line at fault."""
    problem = getattr(error, "problem", None)
    if not problem:
        return ""
    context, mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and mark:
        return f": {problem}, {context} from line {mark.line + 1}"
    return f": {problem}"


class _TooCostly(yaml.MarkedYAMLError):
    """A YAML document over one of the bounds; `problem` says which."""


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, counting as it goes: nesting depth, aliases, the values the document
    expands to with every alias copied out, and the digits of integers. Composing stops at the
    first bound passed, before a Python value is built."""

    def compose_document(self) -> Any:
        self._depth = self._aliases = self._nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            _bound(self._aliases <= MAX_YAML_ALIASES, f"has over {MAX_YAML_ALIASES} aliases", mark)
            node = super().compose_node(parent, index)
            # an alias to an anchor still being composed makes a value that contains itself
            _bound(id(node) in self._sizes, "has an alias inside its own anchor", mark)
            self._count(self._sizes[id(node)], mark)
            return node
        self._depth += 1
        _bound(self._depth <= MAX_YAML_DEPTH, f"nests deeper than {MAX_YAML_DEPTH} levels", mark)
        self._count(1, mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.ScalarNode):
            _bound(
                node.tag != "tag:yaml.org,2002:int" or len(node.value) <= MAX_YAML_DIGITS,
                f"has an integer of over {MAX_YAML_DIGITS} digits",
                mark,
            )
            children = []
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def _count(self, nodes: int, mark: Any) -> None:
        self._nodes += nodes
        _bound(
            self._nodes <= MAX_YAML_NODES,
            f"expands to over {MAX_YAML_NODES:,} values (aliases counted as copies)",
            mark,
        )


def _bound(condition: bool, problem: str, mark: Any) -> None:
    if not condition:
        raise _TooCostly(problem=problem, problem_mark=mark)


try:
    from yaml.cyaml import CParser
except ImportError:  # a PyYAML built without libyaml: the same events, parsed in Python

    class _BoundedLoader(_BoundedComposer, yaml.SafeLoader):
        pass

else:

    class _BoundedLoader(
        _BoundedComposer, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
    ):
        # libyaml parses (C, fast); composing stays in Python, where it can be counted
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


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
        mappings = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, Mapping) and len(mappings) == 1:
            # a section given as a mapping: its own error names the field wrong inside it
            return _convert(mappings[0], value, where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except InputError:
                pass
        raise InputError(f"{where}: must be {_describe(hint)}, got {shown(value)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise InputError(f"{where}: must be {_describe(hint)}, got {shown(value)}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: must be a mapping, got {shown(value)}")
        key, item = typing.get_args(hint)
        return {
            _convert(key, k, where): _convert(item, v, f"{where}.{_key(k)}")
            for k, v in value.items()
        }
    # bool is an int in Python; a YAML `yes` must not pass as a step count.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise InputError(f"{where}: must be {_describe(hint)}, got {shown(value)}")
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
