"""bench.quality's compute accounting: at --equal-compute, every variant spends the same sample-passes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.quality import BOOTSTRAPPED, VARIANTS, extra_steps, sample_passes


def _args(equal_compute: bool, synth_train: int = 4000, batch_size: int = 64, steps: int = 200):
    return argparse.Namespace(equal_compute=equal_compute, synth_train=synth_train, batch_size=batch_size, steps=steps)


@pytest.mark.parametrize(("synth_train", "batch_size"), [(4000, 64), (1000, 32), (129, 64)])
def test_equal_compute_gives_the_variants_without_a_pre_pass_its_cost_in_steps(synth_train, batch_size):
    args = _args(True, synth_train, batch_size)
    passes = {v: sample_passes(v, args.steps + extra_steps(v, args), args) for v in VARIANTS}
    bootstrapped = passes["online"]
    assert passes["offline"] == bootstrapped == 2 * batch_size * 200 + synth_train
    for variant in set(VARIANTS) - set(BOOTSTRAPPED):
        # Whole steps only: at most one step's passes more than the bootstrapped variants, never fewer.
        assert 0 <= passes[variant] - bootstrapped < 2 * batch_size


def test_equal_steps_counts_the_pre_pass_as_extra_compute():
    args = _args(False)
    assert all(extra_steps(v, args) == 0 for v in VARIANTS)
    assert sample_passes("online", 200, args) - sample_passes("plain", 200, args) == 4000
    assert sample_passes("streaming", 200, args) == sample_passes("plain", 200, args) == 2 * 64 * 200


@pytest.mark.parametrize(
    ("data", "folder"), [("shapes", "synth"), ("counts", "synth-counts"), ("words", "synth-words")]
)
def test_each_data_family_has_its_own_set_and_only_new_ones_change_the_run_digests(data, folder):
    from bench.common import ROOT
    from bench.quality import run_settings

    args = argparse.Namespace(
        data=data, synth_dir=None, synth_train=64, synth_test=32, batch_size=16, steps=3, loss="clip", image_size=32
    )
    settings = run_settings(args)
    assert settings["data.synth_dir"] == str(ROOT / "data" / folder)
    # shapes runs carry no data.synth_family, 32-px runs no model.name: the digests of runs already in a work dir
    # still match
    assert settings.get("data.synth_family") == (None if data == "shapes" else data)
    assert "model.name" not in settings
    given = argparse.Namespace(**{**vars(args), "synth_dir": "/elsewhere"})
    assert run_settings(given)["data.synth_dir"] == "/elsewhere"
    # 64 px: a set of its own beside the 32-px one, and the tiny CLIP made for it
    larger = run_settings(argparse.Namespace(**{**vars(args), "image_size": 64}))
    assert larger["data.synth_dir"] == str(ROOT / "data" / f"{folder}-64px")
    assert larger["model.name"].endswith("configs/models/helip-tiny-64.json")
    assert json.loads(Path(larger["model.name"]).read_text())["vision_cfg"]["image_size"] == 64


def test_guarded_arms_carry_the_ratio_and_are_compared_with_plain_and_with_the_guard_off():
    from bench.quality import METRICS, add_guard_flag, guard_arms, paired_deltas, split_guard, variant_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["plain", "online"])
    add_guard_flag(parser, "online")
    args = parser.parse_args(["--positive-ratio", "0.9", "0.95"])
    arms = guard_arms(parser, args, "online")
    assert arms == ["online guard 0.9", "online guard 0.95"]
    assert split_guard("online guard 0.9") == ("online", {"mining.positive_ratio": 0.9})
    assert split_guard("online") == ("online", {})
    settings = argparse.Namespace(hard_ratio=0.5, hnml_weight=0.0, margin=0.2, hnml_form="pair", k=10)
    guarded = variant_settings("online guard 0.9", settings)
    assert guarded == {**variant_settings("online", settings), "mining.positive_ratio": 0.9}
    values = {v: {key: [1.0, 2.0] for key in METRICS} for v in ["plain", "online", *arms]}
    values["online guard 0.9"]["zero_shot/top1"] = [3.0, 5.0]
    deltas = paired_deltas(values, ["plain", "online", *arms])
    assert sorted(deltas) == sorted(
        ["online - plain", "online guard 0.9 - plain", "online guard 0.9 - guard off", "online guard 0.95 - plain",
         "online guard 0.95 - guard off"]
    )  # fmt: skip
    assert deltas["online guard 0.9 - guard off"]["zero_shot/top1"].tolist() == [2.0, 3.0]
    with pytest.raises(SystemExit):
        guard_arms(parser, parser.parse_args(["--positive-ratio", "1.5"]), "online")


def test_the_table_is_rebuilt_from_the_results_alone_with_seeds_ahead():
    from bench.quality import METRICS, table_rows

    def stats(values):
        return {"mean": sum(values) / len(values), "std": 0.0, "values": values}

    r1 = {key: stats([0.02, -0.03, 0.01]) for key in METRICS if "R@1" in key}
    results = {
        "config": {"seeds": [0, 1, 2], "steps": 200, "lr": 2e-4, "loss": "clip", "jobs": 2},
        "metrics": {"plain": {key: stats([0.5, 0.5, 0.5]) for key in METRICS}},
        "delta_vs_plain": {"online - plain": {"zero_shot/top1": stats([0.0, 0.0, 0.0]), **r1}},
        "diagnostics": {"plain": {"guard_dropped_per_hard_pair": 0.0}},
        "sample_passes": {"plain": 100},
        "total_wall_s": 60.0,
    }
    rows = dict(table_rows(results))
    assert rows["online - plain: R@1 per seed (mean of both ways)"] == "+2.0 -3.0 +1.0"
    assert rows["online - plain: seeds ahead on R@1"] == "2 of 3"
    assert rows["seeds x steps (S) / continuation lr / loss / jobs"] == "3 x 200 / 0.0002 / clip / 2"


def test_a_users_own_set_replaces_the_generated_one_and_set_comes_last():
    from bench.quality import run_settings

    args = argparse.Namespace(
        data="counts", synth_dir=None, synth_train=64, synth_test=32, batch_size=16, steps=3, loss="clip",
        image_size=32, train_data="/d/train.csv", eval_dir=None, retrieval_data="/d/val.csv", zeroshot_dir=None,
        set=["data.caption_key=caption", "optim.steps=7"],
    )  # fmt: skip
    settings = run_settings(args)
    assert settings["data.train"] == "/d/train.csv" and settings["data.retrieval_data"] == "/d/val.csv"
    generated = [key for key in settings if key.startswith("data.synth_") or key == "model.name"]
    assert generated == ["data.synth_dir"] and settings["data.synth_dir"] == ""  # emptied: not the runs' data
    assert "data.eval_dir" not in settings and "data.zeroshot_dir" not in settings
    assert settings["data.caption_key"] == "caption" and settings["optim.steps"] == "7"  # --set wins


def test_metrics_of_a_users_own_sources_fill_the_compared_keys_and_missing_ones_are_nan():
    import math

    from bench.train_overhead import canonical_metrics

    own = canonical_metrics({"retrieval_csv/image_to_text_R@1": 0.5, "retrieval_csv/text_to_image_R@1": 0.25})
    assert own["retrieval/image_to_text_R@1"] == 0.5 and own["retrieval/text_to_image_R@1"] == 0.25
    assert math.isnan(own["zero_shot/top1"])
    folder = canonical_metrics({"zero_shot_folder/top1": 0.75, "retrieval_csv/image_to_text_R@1": 0.5})
    assert folder["zero_shot/top1"] == 0.75
    # The synth layout's own figures are never overwritten by another source's
    both = canonical_metrics({"zero_shot/top1": 0.1, "zero_shot_folder/top1": 0.9})
    assert both["zero_shot/top1"] == 0.1 and both["zero_shot_folder/top1"] == 0.9
