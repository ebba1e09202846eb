"""bench.defaults: one setting changed per arm, runs shared with bench.scratch digest for digest, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from bench.defaults import Arm, json_key, parse, parse_arm, seeds_ahead, verdict
from bench.quality import METRICS
from bench.scratch import run_of, scratch_parser


def test_an_arm_changes_one_setting_and_its_runs_are_bench_scratchs():
    (args, cell_flags) = parse(["--data", "counts", "--arms", "k=50", "positive_ratio=0.9", "--steps", "300"])
    cell = args.cells["counts"]
    assert cell_flags == ["--steps", "300"] and cell.steps == 300 and cell.data == "counts"
    k50, guard = args.arms
    assert (k50.label, k50.knob, k50.value) == ("k 50", "k", 50)
    # The same settings as `bench.scratch --data counts --steps 300 [--k 50 | --positive-ratio 0.9]` would train.
    scratch = scratch_parser().parse_args(["--data", "counts", "--steps", "300"])
    assert Arm("plain").run(cell, 3) == run_of(scratch, 3, "plain")
    assert Arm("defaults").run(cell, 3) == run_of(scratch, 3, "streaming")
    with_k = scratch_parser().parse_args(["--data", "counts", "--steps", "300", "--k", "50"])
    assert k50.run(cell, 3) == run_of(with_k, 3, "streaming")
    assert guard.run(cell, 3) == {**run_of(scratch, 3, "streaming"), "mining.positive_ratio": 0.9}
    changed = {key for key, value in k50.run(cell, 3).items() if Arm("defaults").run(cell, 3).get(key) != value}
    assert changed == {"mining.k"}
    assert cell.k == 10, "an arm's run must not change the family's base cell"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k", "want KNOB=VALUE"),
        ("depth=3", "want KNOB=VALUE"),
        ("k=ten", "k takes a int"),
        ("positive_ratio=0", "must be in (0, 1]"),
        ("positive_ratio=1.5", "must be in (0, 1]"),
    ],
)
def test_a_malformed_arm_is_named(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_arm(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arms", "k=0"], "k 0 on counts: mining.k must be >= 1"),  # the trainer's own check, before any run
        (["--arms", "hard_ratio=1.5"], "optim.hard_ratio"),
        (["--arms", "k=10"], "k 10 is the same run as the defaults"),
        (["--arms", "k=20", "k=20"], "k 20 is the same run as k 20"),
        (["--arms", "k=20", "--variants", "plain"], "--variants: bench.defaults sets it itself"),
        (["--arms", "k=20", "--lr", "fast"], "--lr"),  # bench.scratch's parser checks the base cell's flags
        (["--arms", "k=20", "--set", "optim.batch_size=0"], "the base cell on counts: optim.batch_size"),
    ],
)
def test_bad_arms_and_flags_exit_2_before_any_training(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--data", "counts", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_default_holds_unless_the_arm_wins_on_mean_r1_and_on_most_seeds():
    def deltas(i2t, t2i):
        keys = list(METRICS)
        return {keys[0]: np.zeros(len(i2t)), keys[1]: np.array(i2t), keys[2]: np.array(t2i)}

    assert verdict(deltas([0.02, 0.01, 0.03, -0.01], [0.01, 0.02, 0.01, -0.02])) == "arm ahead"
    # Ahead on the mean through one lucky seed: not on most seeds, so the default holds.
    lucky = deltas([0.20, -0.01, -0.01, 0.00], [0.10, -0.01, -0.02, -0.01])
    assert seeds_ahead(lucky) == 1 and verdict(lucky) == "default holds"
    # Ahead on most seeds but behind on the mean.
    assert verdict(deltas([0.01, 0.01, 0.01, -0.20], [0.01, 0.01, 0.01, -0.1])) == "default holds"
    # A tie on every seed: the default holds.
    assert verdict(deltas([0.0] * 4, [0.0] * 4)) == "default holds"


def test_json_key_ignores_order_and_types():
    assert json_key({"a": 1, "b": "x"}) == json_key({"b": "x", "a": "1"})


def test_a_sweeps_tables_come_from_its_results_alone():
    from bench.defaults import compare, summary_rows, table

    def arm(i2t: list[float]) -> dict[str, list[float]]:
        keys = list(METRICS)
        return {keys[0]: [0.3, 0.3, 0.3], keys[1]: i2t, keys[2]: i2t}

    per_family = {
        "counts": compare({"plain": arm([0.5] * 3), "defaults": arm([0.6] * 3), "k 50": arm([0.65, 0.62, 0.55])}),
        "textures": compare({"plain": arm([0.4] * 3), "defaults": arm([0.5] * 3), "k 50": arm([0.45, 0.52, 0.5])}),
    }
    assert per_family["counts"]["k 50"]["seeds_ahead_of_defaults"] == 2
    assert per_family["counts"]["k 50"]["verdict"] == "arm ahead"
    assert per_family["textures"]["k 50"]["verdict"] == "default holds"
    assert per_family["counts"]["defaults"]["minus_plain"][list(METRICS)[1]]["mean"] == pytest.approx(0.1)
    assert "verdict" not in per_family["counts"]["defaults"]
    config = {"data": ["counts", "textures"], "seeds": [0, 1, 2], "arms": ["k 50"], "steps": 600, "lr": 1e-3, "jobs": 2}
    payload = {"config": config, "families": per_family, "total_wall_s": 60.0}
    assert ("the default against k 50", "holds on textures") in summary_rows(payload)
    lines = table(payload)
    assert len(lines) == 2 + 6
    assert lines[-4] == (
        "| counts | k 50 | 30.0 ± 0.0 | 60.7 ± 5.1 | 60.7 ± 5.1 | +0.0 / +10.7 / +10.7 | +0.0 / +0.7 / +0.7 | 2 of 3 "
        "| +5.0 +2.0 -5.0 | arm ahead |  |"
    )
    per_family["counts"]["k 50"]["batches"] = {"hard_slots_filled": 0.987, "guard_dropped_per_hard_pair": 0.0}
    assert table(payload)[-4].endswith("| arm ahead | 0.99 / 0.0 |")
