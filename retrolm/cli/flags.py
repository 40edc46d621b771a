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
    parser: argparse.ArgumentParser, cls: type, names: tuple[str, ...], **extra: dict[str, Any]
) -> None:
    """Add a flag for each field of `cls` in `names`; `extra[name]` adds argparse settings
    (e.g. `choices`) to that field's flag."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    comments = field_comments(cls)
    for name in names:
        kind = _scalar(hints[name])
        settings: dict[str, Any] = {"default": getattr(defaults, name)}
        if kind is bool:
            settings["action"] = argparse.BooleanOptionalAction
        else:
            settings["type"] = kind
        if comments.get(name):
            settings["help"] = comments[name]
        parser.add_argument(flag_name(name), **{**settings, **extra.get(name, {})})


def config_from_flags(cls: type, args: argparse.Namespace, names: tuple[str, ...], **values: Any):  # noqa: ANN201
    """`cls` of the flags `names` (and `values`); the dataclass's ConfigError, naming a field,
    becomes an InputError naming its flag."""
    given = {name: getattr(args, name) for name in names}
    try:
        return cls(**given, **values)
    except ConfigError as e:
        message = str(e)
        field = next((n for n in names if message.startswith(f"{n} ")), None)
        if field is not None:
            message = flag_name(field) + message[len(field) :]
        raise InputError(message) from None
