"""Settings declared once: the type, default, limits and description of every configurable value.

A component's configuration is a frozen dataclass whose fields are declared with :func:`setting` and which calls
:func:`check` in ``__post_init__``::

    @dataclass(frozen=True)
    class MatcherConfig:
        SETTINGS_GROUP: ClassVar[str] = "matching"
        top_k: int = setting(5, "candidates returned per query", min=1, max=1000)

        def __post_init__(self) -> None:
            check(self)

Everything else is derived from these declarations, so a default, a limit or a description is written once:

* validation (:func:`check`, :func:`problem`): type, finiteness, range and choices, with one-line reasons such as
  ``matching.top_k must be >= 1, got 0``; the node applies the same rules at start and when a parameter is set;
* the node's ROS parameters (:mod:`dinomix_ros.ros.parameters`): ``<group>.<field>`` with a descriptor (range,
  read-only when the value is only read at configure);
* ``config/localize.yaml`` and the README's parameter table (:func:`render_yaml`, :func:`render_markdown`; tests
  check that the committed files are what these produce);
* the command line (:func:`add_flags`, :func:`from_flags`): ``--<field with dashes>`` (plus the class's
  ``FLAG_PREFIX``), e.g. ``matching.min_similarity`` is ``--min-similarity``.

ROS-free: nothing here imports rclpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import textwrap
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SettingError",
    "Spec",
    "Entry",
    "setting",
    "spec_of",
    "entries",
    "table",
    "check",
    "problem",
    "coerce",
    "add_flags",
    "from_flags",
    "flag_of",
    "render_yaml",
    "render_markdown",
]

#: Supported field types and how they are spelled in messages and tables.
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string", tuple: "list of strings"}
_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", tuple: "a list of strings"}


class SettingError(ValueError):
    """A setting with a value it cannot take; ``name`` is the qualified name (e.g. ``matching.top_k``)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


@dataclass(frozen=True)
class Spec:
    """Limits and documentation of one setting (see :func:`setting`)."""

    description: str
    min: float | None = None
    max: float | None = None
    positive: bool = False
    choices: tuple | None = None
    nonempty: bool = False
    reconfigure: bool = False

    def limits_text(self) -> str:
        """The limits in words, e.g. ``[0 .. 3600]``, ``> 0`` or ``one of a, b``; empty when there are none."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.positive:
            return f"(0 .. {_num(self.max)}]" if self.max is not None else "> 0"
        if self.min is not None and self.max is not None:
            return f"[{_num(self.min)} .. {_num(self.max)}]"
        if self.min is not None:
            return f">= {_num(self.min)}"
        if self.max is not None:
            return f"<= {_num(self.max)}"
        return ""


def _num(value: float) -> str:
    """A limit as people write it: 2147483647, 0.5, 1e+07."""
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Entry:
    """One setting of a table: qualified name, type, default, spec, and the class and field it comes from."""

    name: str
    type: type
    default: Any
    spec: Spec
    owner: type
    field: str


def setting(default: Any, description: str, *, min: float | None = None, max: float | None = None,
            positive: bool = False, choices: Sequence | None = None, nonempty: bool = False,
            reconfigure: bool = False) -> Any:
    """A dataclass field with its default and :class:`Spec`.

    Args:
        default: the default value (lists are given as tuples: the dataclasses are frozen).
        description: one line for users: what it does, its unit, what 0 or -1 means when they mean "off".
        min: smallest allowed value (inclusive) of an int or float.
        max: largest allowed value (inclusive). Give every float one: non-finite values are always refused, and a
            sane bound turns a typo (1e300) into a clear refusal.
        positive: the value must be > 0 (for floats where 0 is meaningless).
        choices: the allowed values of a string.
        nonempty: a string or list must not be empty.
        reconfigure: the value is read when the component is built (a node's configure transition); the node
            declares such parameters read-only.
    """
    spec = Spec(description, min, max, positive, None if choices is None else tuple(choices), nonempty, reconfigure)
    if isinstance(default, list):
        raise TypeError("list defaults must be tuples (settings dataclasses are frozen)")
    return dataclasses.field(default=default, metadata={"setting": spec})


def _group(cls: type) -> str:
    return getattr(cls, "SETTINGS_GROUP", "")


def _qualified(group: str, name: str) -> str:
    return f"{group}.{name}" if group else name


def _field_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    if origin is tuple or hint is tuple:
        return tuple
    if hint in (bool, int, float, str):
        return hint
    raise TypeError(f"{cls.__name__}.{name}: settings are bool, int, float, str or tuple[str, ...], not {hint}")


def entries(cls: type, group: str | None = None, fields: Iterable[str] | None = None) -> list[Entry]:
    """The settings of a dataclass, in declaration order (``fields`` picks and orders a subset)."""
    group = _group(cls) if group is None else group
    declared = {f.name: f for f in dataclasses.fields(cls) if "setting" in f.metadata}
    names = list(declared) if fields is None else list(fields)
    out = []
    for name in names:
        if name not in declared:
            raise KeyError(f"{cls.__name__} has no setting {name!r}")
        f = declared[name]
        out.append(Entry(_qualified(group, name), _field_type(cls, name), f.default, f.metadata["setting"], cls, name))
    return out


def spec_of(cls: type, name: str) -> Spec:
    """The :class:`Spec` of field ``name`` of ``cls``."""
    return entries(cls, fields=[name])[0].spec


def table(*parts: type | tuple) -> dict[str, Entry]:
    """Qualified name -> :class:`Entry` over several classes: each part is a class or ``(class, fields)``.

    A group's settings must be contiguous: rendered as YAML a group is one mapping, and a group split by another
    would be two mappings of the same key (the second silently replacing the first).
    """
    out: dict[str, Entry] = {}
    closed: set[str] = set()  # groups another group has followed
    for part in parts:
        cls, fields = part if isinstance(part, tuple) else (part, None)
        for entry in entries(cls, fields=fields):
            if entry.name in out:
                raise ValueError(f"setting {entry.name} is declared twice ({out[entry.name].owner.__name__}, "
                                 f"{cls.__name__})")
            group = entry.name.rpartition(".")[0]
            last = next(reversed(out)).rpartition(".")[0] if out else group
            if group != last:
                closed.add(last)
            if group in closed:
                raise ValueError(f"settings of group {group!r} are split by another group ({cls.__name__}): "
                                 "keep a group's classes next to each other")
            out[entry.name] = entry
    return out


# ---------------------------------------------------------------------------------------------------- validation


def coerce(value: Any, kind: type) -> Any:
    """``value`` as a plain Python value of ``kind`` where that loses nothing (int -> float, list -> tuple, numpy
    scalars -> Python); anything else is returned unchanged for :func:`problem` to refuse."""
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is bool and type(value).__name__ == "bool_":  # numpy.bool_ without importing numpy
        return bool(value)
    if kind is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def problem(entry: Entry, value: Any) -> str | None:
    """Why ``value`` is not acceptable for the setting (None when it is); ``value`` is already coerced."""
    name, spec, kind = entry.name, entry.spec, entry.type
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, float)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if not ok:
        return f"{name} must be {_TYPE_WORDS[kind]}, got {value!r}"
    if kind is float and not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if kind in (int, float):
        if spec.positive and not value > 0:
            return f"{name} must be > 0, got {value!r}"
        if spec.min is not None and value < spec.min:
            return f"{name} must be >= {spec.min:g}, got {value!r}"
        if spec.max is not None and value > spec.max:
            return f"{name} must be <= {spec.max:g}, got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return f"{name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if spec.nonempty and (len(value) == 0 or (kind is tuple and not all(value))):
        return f"{name} must not be empty" + (" (nor hold an empty entry)" if kind is tuple else "")
    if kind in (str, tuple):
        for text in (value,) if kind is str else value:
            if any(ord(c) < 32 or ord(c) == 127 for c in text):
                return f"{name} must be printable text without control characters, got {text!r}"
    return None


def check(obj: Any) -> None:
    """Coerce and validate every setting field of a settings dataclass instance (call it in ``__post_init__``).

    Raises:
        SettingError: the first field whose value is refused, with a one-line reason.
    """
    for entry in entries(type(obj)):
        value = coerce(getattr(obj, entry.field), entry.type)
        reason = problem(entry, value)
        if reason:
            raise SettingError(entry.name, reason)
        object.__setattr__(obj, entry.field, value)


# ---------------------------------------------------------------------------------------------------- command line


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls``: ``--`` + FLAG_PREFIX + the field with dashes."""
    return "--" + getattr(cls, "FLAG_PREFIX", "") + name.replace("_", "-")


def _dest(cls: type, name: str) -> str:
    return flag_of(cls, name)[2:].replace("-", "_")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              fields: Iterable[str] | None = None, **defaults: Any) -> None:
    """Add one flag per setting of ``cls`` (``fields`` picks a subset; ``defaults`` overrides a default here)."""
    for entry in entries(cls, fields=fields):
        default = defaults.get(entry.field, entry.default)
        help_text = entry.spec.description
        limits = entry.spec.limits_text()
        if limits and entry.spec.choices is None:
            help_text += f" ({limits})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a literal "1%" must be escaped
        kwargs: dict[str, Any] = {"dest": _dest(cls, entry.field), "default": default, "help": help_text}
        if entry.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif entry.type is tuple:
            kwargs.update(nargs="+", metavar="VALUE")
        else:
            kwargs["type"] = entry.type
            if entry.spec.choices is not None:
                kwargs["choices"] = entry.spec.choices
        parser.add_argument(flag_of(cls, entry.field), **kwargs)


def from_flags(cls: type, args: argparse.Namespace, fields: Iterable[str] | None = None, **overrides: Any) -> Any:
    """Build ``cls`` from the flags :func:`add_flags` added; a refused value names its flag.

    Raises:
        SettingError: a value out of range, with the flag in the message (``--top-k must be >= 1, got 0``).
    """
    values = {e.field: getattr(args, _dest(cls, e.field)) for e in entries(cls, fields=fields)
              if hasattr(args, _dest(cls, e.field))}
    values.update(overrides)
    try:
        return cls(**values)
    except SettingError as exc:
        field = exc.name.rsplit(".", 1)[-1]
        flag = flag_of(cls, field)
        raise SettingError(exc.name, str(exc).replace(exc.name, flag, 1)) from None


# ---------------------------------------------------------------------------------------------------- documents


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_yaml(entries_by_name: dict[str, Entry], node_name: str, header: str, width: int = 118) -> str:
    """A ROS 2 parameters file with every setting at its default, each preceded by its description and limits."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{node_name}:", "  ros__parameters:"]
    open_groups: list[str] = []
    for name, entry in entries_by_name.items():
        *groups, leaf = name.split(".")
        common = 0
        while common < min(len(groups), len(open_groups)) and groups[common] == open_groups[common]:
            common += 1
        open_groups = open_groups[:common]
        for group in groups[common:]:
            lines.append("    " + "  " * len(open_groups) + f"{group}:")
            open_groups.append(group)
        indent = "    " + "  " * len(open_groups)
        comment = entry.spec.description
        limits = entry.spec.limits_text()
        if limits:
            comment += f"; {limits}"
        if entry.spec.reconfigure:
            comment += " (read at configure)"
        lines += textwrap.wrap(comment, width=width, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}#   ",
                               break_on_hyphens=False)
        lines.append(f"{indent}{leaf}: {_yaml_value(entry.default)}")
    return "\n".join(lines) + "\n"


def render_markdown(entries_by_name: dict[str, Entry]) -> str:
    """A Markdown table: name, type, default, limits, description (``*`` marks settings read at configure)."""
    rows = ["| parameter | type | default | limits | description |", "|---|---|---|---|---|"]
    for name, entry in entries_by_name.items():
        default = entry.default
        shown = (", ".join(default) if isinstance(default, tuple) else
                 str(default).lower() if isinstance(default, bool) else
                 ('""' if default == "" else str(default)))
        description = entry.spec.description.replace("|", "\\|")
        rows.append(f"| `{name}`{' *' if entry.spec.reconfigure else ''} | {_TYPE_NAMES[entry.type]} | `{shown}` | "
                    f"{entry.spec.limits_text().replace('|', chr(92) + '|')} | {description} |")
    return "\n".join(rows) + "\n"
