"""Load a job config: TOML file, then command-line overrides, strictly checked.

``SwallowConfigManager`` is torchtitan's ``ConfigManager`` with three changes:
swallow-titan's sections are always merged in; every TOML key is checked
against the dataclass tree (unknown keys, wrong types, unknown literal values,
``[[tables]]`` of entries) with an error naming the file, the key and what was
expected; and a missing or unparsable file is reported as such.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan.config import ConfigManager, JobConfig

from swallow_titan.config import sections
from swallow_titan.config.errors import ConfigError, config_error


def merged_job_config_class() -> type:
    """torchtitan's JobConfig with swallow-titan's sections merged in."""
    return ConfigManager._merge_configs(JobConfig, sections.JobConfig)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(
            _type_name(a) for a in typing.get_args(tp) if a is not type(None)
        )
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _value_desc(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{shown[:60]} ({kind})"


class _Checker:
    """Converts TOML values into config dataclasses, checking every key."""

    def __init__(self, source: str):
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return config_error(self.source, key, message)

    def to_dataclass(self, cls: type, data: dict[str, Any], key: str) -> Any:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for name, value in data.items():
            sub_key = f"{key}.{name}" if key else name
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                section = f"[{key}]" if key else "the top level"
                raise self.error(sub_key, f"unknown key in {section}{hint}")
            values[name] = self.convert(hints[name], value, sub_key)
        return cls(**values)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            for option in options:
                try:
                    return self.convert(option, value, key)
                except ConfigError:
                    continue
            raise self.error(
                key, f"expected {_type_name(tp)}, got {_value_desc(value)}"
            )
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise self.error(
                    key, f"expected {_type_name(tp)}, got {_value_desc(value)}"
                )
            return value
        if origin is list:
            (item,) = typing.get_args(tp) or (Any,)
            if isinstance(value, str) and item is str:
                # torchtitan accepts "a,b,c" for list[str] on the command line.
                return [v for v in value.split(",") if v]
            if not isinstance(value, list):
                raise self.error(
                    key, f"expected {_type_name(tp)}, got {_value_desc(value)}"
                )
            return [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            key_type, value_type = typing.get_args(tp) or (Any, Any)
            if not isinstance(value, dict):
                raise self.error(key, f"expected a table, got {_value_desc(value)}")
            return {
                self.convert(key_type, k, key): self.convert(value_type, v, f"{key}.{k}")
                for k, v in value.items()
            }
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.error(key, f"expected a table, got {_value_desc(value)}")
            return self.to_dataclass(tp, value, key)
        if tp is Any:
            return value
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif tp is str:
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise self.error(
                key, f"expected {_type_name(tp)}, got {_value_desc(value)}"
            )
        return value


class SwallowConfigManager(ConfigManager):
    """torchtitan's ConfigManager with strict checking and our sections merged."""

    def __init__(self) -> None:
        super().__init__(config_cls=merged_job_config_class())
        self.config_file: str | None = None

    def parse_args(self, args: list[str] | None = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_args(_bool_values_to_flags(args, self.config_cls))

    def _maybe_load_toml(self, args: list[str]) -> dict[str, Any] | None:
        path = _config_file_arg(args)
        if path is None:
            return None
        self.config_file = path
        try:
            with open(path, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise config_error(path, None, "config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise config_error(path, None, f"not valid TOML: {e}") from None

    def _dict_to_dataclass(self, cls: type, data: dict[str, Any]) -> Any:
        return _Checker(self.config_file or "<config>").to_dataclass(cls, data, "")


def _bool_paths(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every bool field in a config dataclass tree."""
    paths = set()
    for name, tp in typing.get_type_hints(cls).items():
        if tp is bool:
            paths.add(prefix + name)
        elif dataclasses.is_dataclass(tp):
            paths |= _bool_paths(tp, f"{prefix}{name}.")
    return paths


def _bool_values_to_flags(args: list[str], cls: type) -> list[str]:
    """Accept ``--section.flag true|false`` as well as tyro's flag spelling.

    tyro takes booleans as ``--section.flag`` / ``--section.no-flag``; people
    (and TOML habits) write ``--section.flag false``.
    """
    bools = _bool_paths(cls)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        path = key[2:].replace("-", "_") if key.startswith("--") else ""
        if path in bools:
            if not eq and i + 1 < len(args) and args[i + 1].lower() in ("true", "false"):
                value, eq = args[i + 1], "="
                i += 1
            if eq:
                if value.lower() not in ("true", "false"):
                    raise config_error("<command line>", f"--{path}", f"expected true or false, got {value!r}")
                section, _, name = path.rpartition(".")
                prefix = f"--{section}." if section else "--"
                arg = f"{prefix}{name}" if value.lower() == "true" else f"{prefix}no_{name}"
        out.append(arg)
        i += 1
    return out


def _config_file_arg(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            if eq:
                return value
            if i + 1 < len(args):
                return args[i + 1]
    return None


def load_job_config(config_file: str | Path, overrides: list[str] = ()) -> Any:
    """Parse ``config_file`` plus ``--section.key value`` overrides."""
    manager = SwallowConfigManager()
    return manager.parse_args(["--job.config_file", str(config_file), *overrides])
