"""One precision per run: `model.precision` decides the DeepSpeed JSON's bf16 and fp16 blocks.

A JSON without those blocks (the shipped configs/deepspeed/*.json) gets them from model.precision. A JSON that
enables or disables one explicitly must agree with model.precision, or the run stops before it starts with an
error naming both settings: two sources of truth that disagree are a mistake, not a preference to guess at.
Other entries of the blocks (loss scaling, ...) are kept.
"""

from __future__ import annotations

from typing import Any

# DeepSpeed's names for the half-precision blocks; "bfloat16" is its older spelling of "bf16".
BLOCKS = {"bf16": ("bf16", "bfloat16"), "fp16": ("fp16",)}


def apply_precision(ds_config: dict[str, Any], precision: str, source: str) -> dict[str, Any]:
    """A copy of `ds_config` whose bf16/fp16 blocks say `precision` ("fp32", "bf16" or "fp16").

    source: where ds_config came from (the JSON's path), for the error message.
    Raises ValueError when a block's explicit "enabled" contradicts `precision`.
    """
    ds_config = dict(ds_config)
    for precision_name, keys in BLOCKS.items():
        wanted = precision == precision_name
        block: dict[str, Any] = {}
        for key in keys:
            if key not in ds_config:
                continue
            found = ds_config.pop(key)
            if not isinstance(found, dict):
                raise ValueError(f"{source}: {key} must be a mapping, got {found!r}")
            enabled = found.get("enabled", "auto")
            if enabled != "auto" and bool(enabled) != wanted:
                raise ValueError(
                    f"{source} says {key}.enabled={str(enabled).lower()} but model.precision is {precision!r}: "
                    f"set model.precision (--precision) to the precision you want and drop the JSON's "
                    f"{key} block (or make it agree)"
                )
            block.update(found)
        block["enabled"] = wanted
        ds_config[precision_name] = block
    return ds_config


def enabled_precision(ds_config: dict[str, Any]) -> str:
    """Which precision a DeepSpeed JSON (after apply_precision) trains in."""
    for precision_name in ("bf16", "fp16"):
        if ds_config.get(precision_name, {}).get("enabled"):
            return precision_name
    return "fp32"
