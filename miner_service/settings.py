"""Typed dataclass configs from mappings: YAML files, environment variables and flags all land here.

Shared by the miner's and the trainer's configs, so that both read values and report mistakes the same way: an
unknown key or an unreadable value is a ValueError naming the dotted key.
"""

from __future__ import annotations

import dataclasses


def coerce(current, value, where: str):
    """`value` as the type of the field's current value (text from flags and environment is parsed)."""
    if isinstance(value, str) and not isinstance(current, str):
        if isinstance(current, bool):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        if current is None:
            return value or None
        try:
            return type(current)(value)
        except ValueError:
            raise ValueError(f"{where}: cannot read {value!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def overlay(config, values: dict, where: str):
    """A copy of dataclass `config` with nested `values` applied (nested dicts for nested configs)."""
    known = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(config, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping")
            changes[name] = overlay(current, value, f"{where}.{key}")
        else:
            changes[name] = coerce(current, value, f"{where}.{key}")
    return dataclasses.replace(config, **changes)


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
