"""model.precision decides the DeepSpeed JSON's bf16/fp16 blocks; a JSON that disagrees is refused."""

from __future__ import annotations

import json

import pytest

from helip.trainer.app.precision import apply_precision, enabled_precision
from tests.conftest import ROOT


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shipped", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_take_any_precision(shipped, precision):
    ds_config = apply_precision(json.loads(shipped.read_text()), precision, str(shipped))
    assert enabled_precision(ds_config) == precision
    assert ds_config["bf16"]["enabled"] is (precision == "bf16")
    assert ds_config["fp16"]["enabled"] is (precision == "fp16")


def test_agreeing_blocks_keep_their_other_settings():
    ds_config = {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}, "bf16": {"enabled": False}}
    applied = apply_precision(ds_config, "fp16", "ds.json")
    assert applied["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    assert applied["bf16"] == {"enabled": False}
    assert ds_config["fp16"]["enabled"] is True and "bf16" in ds_config  # the caller's dict is left alone


def test_auto_and_the_old_bfloat16_spelling_follow_model_precision():
    applied = apply_precision({"bfloat16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, "bf16", "ds.json")
    assert "bfloat16" not in applied and applied["bf16"] == {"enabled": True} and applied["fp16"] == {"enabled": False}


@pytest.mark.parametrize(
    ("ds_config", "precision", "names"),
    [
        ({"bf16": {"enabled": True}}, "fp32", ["bf16.enabled=true", "model.precision is 'fp32'"]),
        ({"bf16": {"enabled": False}}, "bf16", ["bf16.enabled=false", "model.precision is 'bf16'"]),
        ({"fp16": {"enabled": True}}, "bf16", ["fp16.enabled=true", "model.precision is 'bf16'"]),
        ({"bfloat16": {"enabled": True}}, "fp16", ["bfloat16.enabled=true", "model.precision is 'fp16'"]),
    ],
)
def test_a_json_that_disagrees_names_both_settings(ds_config, precision, names):
    with pytest.raises(ValueError) as raised:
        apply_precision(ds_config, precision, "my/ds.json")
    message = str(raised.value)
    assert "my/ds.json" in message
    for name in names:
        assert name in message


def test_a_block_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="ds.json: bf16 must be a mapping"):
        apply_precision({"bf16": True}, "bf16", "ds.json")
