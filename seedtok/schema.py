"""One typed config schema for the whole toolkit: dataclasses that serve Python, YAML and the CLI.

Every stage's config is a dataclass deriving from :class:`ConfigBase`. Each field carries its
help text in ``metadata={"help": ...}`` (use :func:`option`). The same class then gives

* ``Cfg(...)`` in Python, with types checked by :meth:`ConfigBase.from_dict`;
* ``Cfg.from_yaml(path)`` / ``cfg.to_yaml(path)`` — the resolved config is saved next to every
  artefact a stage writes;
* ``Cfg.add_arguments(parser)`` / ``Cfg.from_cli(args)`` — one ``--field-name`` flag per field
  (nested configs as ``--sub.field-name``), a ``--config FILE`` to start from, flags overriding it.

Unknown keys and values of the wrong type are a :class:`~seedtok.errors.ConfigError` naming the
key, never silently ignored.

We keep this small module rather than depend on jsonargparse: the toolkit needs only flat
dataclasses, strict YAML and argparse flags, and owning the error messages keeps them one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from seedtok.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text (shown by ``--help`` and kept in the schema)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not of type {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, _prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def _plain(value: Any) -> Any:
    """A YAML/JSON-friendly copy of a config value."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


@dataclasses.dataclass
class ConfigBase:
    """Base of every config dataclass in the toolkit (see the module docstring)."""

    # ---- dict / YAML -------------------------------------------------------------------
    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, _prefix: str = "") -> T:
        """Build a config from a mapping; unknown keys and wrong types raise ConfigError."""
        data = dict(data or {})
        hints = cls._hints()
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key '{_prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
            )
        # A partial mapping for a nested config overrides that field's *default* (e.g. a preset
        # built by a default_factory), not the nested class's bare defaults.
        for f in dataclasses.fields(cls):
            value = data.get(f.name)
            tp = hints.get(f.name)
            if isinstance(value, dict) and isinstance(tp, type) and issubclass(tp, ConfigBase):
                if f.default_factory is not dataclasses.MISSING:
                    base = f.default_factory()
                elif isinstance(f.default, ConfigBase):
                    base = f.default
                else:
                    continue
                data[f.name] = _deep_merge(base.to_dict(), value)
        kwargs = {k: _coerce(v, hints[k], f"{_prefix}{k}") for k, v in data.items()}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required key '{_prefix}{missing[0]}'")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_yaml(cls: type[T], path: str | os.PathLike) -> T:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        """Write the resolved config (atomically) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)
        return path

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed, type-checked like :meth:`from_dict`."""
        return type(self).from_dict({**self.to_dict(), **changes})

    # ---- command line ------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, prefix: str = "", config_flag: bool = True) -> None:
        """Add ``--config`` and one flag per field; values given override the config file."""
        if config_flag and not prefix:
            parser.add_argument(
                "--config", type=Path, default=None, metavar="YAML",
                help=f"start from this {cls.__name__} YAML file; flags override its values",
            )
        hints = cls._hints()
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = hints[f.name]
            dest = f"{prefix}{f.name}"
            flag = "--" + dest.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if isinstance(tp, type) and issubclass(tp, ConfigBase):
                tp.add_arguments(parser, prefix=f"{dest}.", config_flag=False)
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            shown = _plain(default)
            kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                      "help": f"{help_text} (default: {shown})"}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(tp) is Literal:
                kwargs["choices"] = list(get_args(tp))
                kwargs["metavar"] = "{" + ",".join(map(str, get_args(tp))) + "}"
            elif get_origin(tp) in (list, tuple, dict) or (
                get_origin(tp) in (Union, types.UnionType)
                and any(get_origin(a) in (list, tuple, dict) for a in get_args(tp))
            ):
                kwargs["type"] = _yaml_value
                kwargs["metavar"] = "YAML"
            else:
                kwargs["type"] = str
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli(cls: type[T], args: argparse.Namespace, *, prefix: str = "") -> T:
        """The config from ``--config`` (if given) overridden by the flags that were passed."""
        base: dict[str, Any] = {}
        cfg_path = getattr(args, "config", None)
        if cfg_path is not None and not prefix:
            base = cls.from_yaml(cfg_path).to_dict()
        for key, value in vars(args).items():
            if not key.startswith(prefix) or key == "config":
                continue
            parts = key[len(prefix):].split(".")
            node = base
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        # Keep only keys that belong to this schema (the parser may hold other sub-command flags).
        return cls.from_dict(_select(cls, base))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _select(cls: type[ConfigBase], data: dict[str, Any]) -> dict[str, Any]:
    hints = cls._hints()
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for k, v in data.items():
        if k not in names:
            continue
        tp = hints[k]
        if isinstance(tp, type) and issubclass(tp, ConfigBase) and isinstance(v, dict):
            v = _select(tp, v)
        out[k] = v
    return out


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r}") from None
