"""Command-line flags derived from a config dataclass, so that the dataclass is the one place a
setting is declared: `--field-name` per field, its type from the annotation, its default from
the dataclass, its help from the comment beside the field (or the comment lines just above it),
and its checks from the dataclass's `__post_init__`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any

from retrolm.errors import ConfigError, InputError

_FIELD_LINE = re.compile(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of dataclass `cls`: the comment lines just above its line,
    then the comment at the end of it."""
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(text)
        if match and match.group(1) in names and match.group(1) not in comments:
            comments[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
        above = []
    return comments


def _scalar(annotation: Any) -> type:
    """int, float, str or bool of an annotation such as `int | None`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _scalar(kinds[0])
    if annotation in (int, float, str, bool):
        return annotation
    raise TypeError(f"no flag for a field of type {annotation!r}")


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ActionsContainer,
    cls: type,
    names: tuple[str, ...],
    *,
    flags: dict[str, str] | None = None,
    unset: bool = False,
    **extra: dict[str, Any],
) -> None:
    """Add a flag for each field of `cls` in `names`, its value stored under the field's name.

    `flags[name]` names a field's flag where it is not `--field-name`; with `unset`, a flag not
    given is None (so that a command can layer flags over a config file); `extra[name]` adds
    argparse settings (e.g. `choices`) to that field's flag.
    """
    hints = typing.get_type_hints(cls)
    defaults = cls()
    comments = field_comments(cls)
    flags = flags or {}
    for name in names:
        kind = _scalar(hints[name])
        settings: dict[str, Any] = {
            "dest": name,
            "default": None if unset else getattr(defaults, name),
        }
        if kind is bool:
            settings["action"] = argparse.BooleanOptionalAction
        else:
            settings["type"] = kind
        if comments.get(name):
            settings["help"] = comments[name]
        flag = flags.get(name, flag_name(name))
        if kind is not bool:
            settings["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **{**settings, **extra.get(name, {})})


def flag_error(
    error: ConfigError, cls: type, names: tuple[str, ...], flags: dict[str, str] | None = None
) -> InputError:
    """The ConfigError of a config dataclass, naming a field (`field ...` or `Class.field ...`),
    as an InputError naming the field's flag when the field is among `names`."""
    message = str(error)
    for name in names:
        for prefix in (f"{cls.__name__}.{name} ", f"{name} "):
            if message.startswith(prefix):
                flag = (flags or {}).get(name, flag_name(name))
                return InputError(flag + " " + message[len(prefix) :])
    return InputError(message)


def config_from_flags(cls: type, args: argparse.Namespace, names: tuple[str, ...], **values: Any):  # noqa: ANN201
    """`cls` of the flags `names` (and `values`); the dataclass's ConfigError, naming a field,
    becomes an InputError naming its flag."""
    given = {name: getattr(args, name) for name in names}
    try:
        return cls(**given, **values)
    except ConfigError as e:
        raise flag_error(e, cls, names) from None
