"""Derive argparse flags and RILLET_* environment variables from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "RILLET_"


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(annotation: Any) -> type:
    """int | None -> int; list[str] -> list."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "str": str, "int": int, "float": float, "bool": bool})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return list
    return annotation


def _parse(kind: type, text: str) -> Any:
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind is list:
        return [part.strip() for part in text.split(",") if part.strip()]
    return kind(text)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, title: str) -> None:
    """Add one flag per field of `config_cls`; defaults come from RILLET_* env vars, then the field."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_cls):
        kind = _base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        env = env_name(f.name)
        help_text = f.metadata.get("help", "")
        help_text += f" [env {env}" + (f"; default {default}]" if default not in (None, []) else "]")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (lambda text, k=kind: _parse(k, text))
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs.pop("metavar")
                kwargs["type"] = str
        group.add_argument(flag_name(f.name), **kwargs)


def config_from_args(config_cls: type[T], args: argparse.Namespace, environ: dict[str, str] | None = None) -> T:
    """Build a config: command-line flag, else RILLET_* env var, else the declared default."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        elif env_name(f.name) in environ:
            try:
                values[f.name] = _parse(_base_type(f.type), environ[env_name(f.name)])
            except ValueError as exc:
                raise ValueError(f"{env_name(f.name)}: {exc}") from None
    return config_cls(**values)
