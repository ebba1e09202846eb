"""Typed dataclass configs from mappings: YAML files, environment variables and flags all land here.

Shared by the miner's and the trainer's configs, so that both read values and report mistakes the same way: an
unknown key or an unreadable value is a ValueError naming the dotted key.
"""

from __future__ import annotations

import dataclasses

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def coerce(current, value, where: str):
    """`value` as the type of the field's current value; text (flags, environment) is parsed, and anything that
    is not clearly of that type is a ValueError naming the key: "ture" is not False, 1.5 is not an int."""
    kind = type(current).__name__
    if current is None:  # an optional setting whose default is None: text, or nothing
        return value or None if isinstance(value, str) else value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}: expected a boolean (true/false, yes/no, 1/0), got {value!r}")
    if isinstance(current, (int, float)):
        if isinstance(value, str):
            try:
                return type(current)(value)
            except ValueError:
                raise ValueError(f"{where}: cannot read {value!r} as {kind}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return type(current)(value)
        if isinstance(value, float) and isinstance(current, float):
            return value
        raise ValueError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")
    if isinstance(current, str) and not isinstance(value, str):
        raise ValueError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value


def coerced(config, values: dict, where: str) -> dict:
    """`values` (nested dicts for nested configs) checked against dataclass `config`'s fields and read as their
    types; unknown keys and unreadable values are a ValueError naming the dotted key under `where`."""
    known = {f.name for f in dataclasses.fields(config)}
    read = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping")
            read[name] = coerced(current, value, f"{where}.{key}")
        else:
            read[name] = coerce(current, value, f"{where}.{key}")
    return read


def merged(*layers: dict) -> dict:
    """Nested dicts merged key by key, a later layer winning."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def applied(config, values: dict):
    """A copy of `config` with already-read nested `values`; each (nested) config is built once, so its
    `__post_init__` checks the final values, never a half-applied mix of sources."""
    changes = {
        name: applied(getattr(config, name), value) if isinstance(value, dict) else value
        for name, value in values.items()
    }
    return dataclasses.replace(config, **changes) if changes else config


def overlay(config, values: dict, where: str):
    """A copy of dataclass `config` with nested `values` applied (nested dicts for nested configs)."""
    return applied(config, coerced(config, values, where))


def layered(config, *sources: tuple[dict, str]):
    """`config` with several sources applied in order, later ones winning: each source's keys and values are
    checked under its own name ("miner.yaml", "environment", "flags"), then the config is built once, so a
    check across fields (a log needs a snapshot directory) sees every source's values together."""
    return applied(config, merged(*(coerced(config, values, where) for values, where in sources)))


def nest(flat: dict, separator: str = ".") -> dict:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}; None values (flags not given) are skipped."""
    nested: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(separator)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
