"""Strict loading of typed configs: TOML tables -> frozen dataclasses, plus `--set` overrides.

Any dataclass tree whose leaves are str / int / float / bool / tuple[...] / X | None loads here.
An unknown key, a missing required key or a value of the wrong type is a `ConfigError` naming
the dotted key, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override that does not match the typed config."""


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, naming the file in any parse error."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def build(cls: type, table: dict[str, Any], *, where: str = "") -> Any:
    """Build dataclass `cls` from a plain table, rejecting unknown and mistyped keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{_join(where, unknown[0])}' "
            f"(known keys of [{where or 'top level'}]: {', '.join(sorted(fields))})"
        )
    values = {}
    for name in fields:
        key = _join(where, name)
        if name in table:
            values[name] = _convert(hints[name], table[name], key)
        elif _is_required(fields[name]):
            if dataclasses.is_dataclass(hints[name]):
                values[name] = build(hints[name], {}, where=key)
            else:
                raise ConfigError(f"missing required config key '{key}'")
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(f"[{where or 'top level'}] {error}") from None


def apply_override(table: dict[str, Any], cls: type, assignment: str) -> None:
    """Apply one `section.key=value` override to a raw table, checking the key against `cls`.

    Items of a list of sections are addressed by their 1-based position:
    `train.stages.2.num_steps=500`.
    """
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, raw_value = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    target_cls, node, depth = cls, table, 0
    while depth < len(parts):
        part, where = parts[depth], ".".join(parts[: depth + 1])
        names = {field.name for field in dataclasses.fields(target_cls)}
        if part not in names:
            raise ConfigError(f"unknown config key '{where}' in override")
        hint = typing.get_type_hints(target_cls)[part]
        if depth == len(parts) - 1:
            node[part] = _parse_override_value(raw_value, hint)
            return
        if dataclasses.is_dataclass(hint):
            node, target_cls = node.setdefault(part, {}), hint
        elif _is_section_list(hint):
            node, target_cls = _list_item(node, part, parts, depth), typing.get_args(hint)[0]
            depth += 1
        else:
            raise ConfigError(f"config key '{where}' is not a section")
        depth += 1


def _is_section_list(hint: Any) -> bool:
    args = typing.get_args(hint)
    return typing.get_origin(hint) is tuple and bool(args) and dataclasses.is_dataclass(args[0])


def _list_item(node: dict[str, Any], part: str, parts: list[str], depth: int) -> dict[str, Any]:
    where = ".".join(parts[: depth + 1])
    items = node.get(part)
    position = parts[depth + 1] if depth + 1 < len(parts) else ""
    if not isinstance(items, list) or not position.isdigit():
        raise ConfigError(f"'{where}' is a list of sections: address items as {where}.<n>")
    if not 1 <= int(position) <= len(items):
        raise ConfigError(f"'{where}' has {len(items)} items; {where}.{position} does not exist")
    return items[int(position) - 1]


def to_plain(config: Any) -> dict[str, Any]:
    """A dataclass tree as nested plain dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flatten(config: Any) -> dict[str, Any]:
    """`section.key -> value` for logging as tracking params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(_join(prefix, key), value)
        else:
            flat[prefix] = node

    walk("", to_plain(config))
    return flat


def config_hash(config: Any) -> str:
    """Stable sha256 of the resolved config (what the manifest records)."""
    canonical = json.dumps(to_plain(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where=key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item_type = typing.get_args(hint)[0]
        return tuple(_convert(item_type, item, f"{key}.{i + 1}") for i, item in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool) and not _exact_type(value, hint):
        raise ConfigError(
            f"config key '{key}' expects {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _exact_type(value: Any, hint: type) -> bool:
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _parse_override_value(raw: str, hint: Any) -> Any:
    """Parse an override against its field's type; `none` clears an optional field."""
    text = raw.strip()
    options = typing.get_args(hint)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    base = next((arg for arg in options if arg is not type(None)), hint) if options else hint
    if typing.get_origin(hint) is tuple or typing.get_origin(base) is tuple:
        if text.startswith("["):
            return tomllib.loads(f"value = {text}")["value"]
        return [item.strip() for item in text.split(",") if item.strip()]
    if base is str:
        return text
    if base is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"override '{raw}' expects true or false")
        return text.lower() == "true"
    try:
        return int(text) if base is int else float(text)
    except ValueError:
        raise ConfigError(f"override value '{raw}' is not a valid {base.__name__}") from None
