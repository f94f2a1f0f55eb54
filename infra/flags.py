"""Command-line flags generated from a settings class: one ``--name`` per
documented field, typed and described as the field is, so a setting is
written once (in ``infra.settings``) and reachable from the environment
(``SHOAL_NAME``) and the command line (``--name``) alike."""

from __future__ import annotations

import argparse
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

_SCALARS: tuple[type, ...] = (int, float, str, Path)


def _scalar(annotation: Any) -> Any:
    """The one non-None type of ``X | None``, or the annotation itself."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return annotation


def _flag_kwargs(info: FieldInfo) -> dict[str, Any] | None:
    """argparse keywords for a field, or None if it has no flag form: lists
    and mappings are set through the environment, and so are secrets
    (``SecretStr``: a command line is visible to every user of the host)."""
    kind = _scalar(info.annotation)
    help_text = (info.description or "").split("\n\n", 1)[0].replace("%", "%%")
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None, "help": help_text}
    if get_origin(kind) is Literal:
        return {"choices": [str(c) for c in get_args(kind)], "help": help_text}
    if isinstance(kind, type) and issubclass(kind, Enum):
        return {"choices": [str(e.value) for e in kind], "help": help_text}
    if kind in _SCALARS:
        return {"type": kind, "help": help_text}
    return None


def add_settings_flags(
    parser: argparse.ArgumentParser, settings: type[BaseSettings], *,
    only: typing.Collection[str] | None = None,
) -> None:  # fmt: skip
    """A ``--field-name`` flag for each field of ``settings`` (or of ``only``)."""
    for name, info in settings.model_fields.items():
        if only is not None and name not in only:
            continue
        if (kwargs := _flag_kwargs(info)) is not None:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


def given(args: argparse.Namespace, settings: type[BaseSettings]) -> dict[str, Any]:
    """The fields of ``settings`` that were given on the command line."""
    return {
        n: getattr(args, n) for n in settings.model_fields if getattr(args, n, None) is not None
    }
