"""`helip-train`'s evaluation settings: bad ones end the run before it starts, with exit 2 naming the key."""

from __future__ import annotations

import pytest
from PIL import Image

from helip.trainer.app import cli
from helip.trainer.app.config import RunConfig, load
from helip.trainer.tools.eval import suite_from_data


@pytest.fixture()
def layout(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "val" / name / "0.png")
    (tmp_path / "train.csv").write_text("filepath\ttitle\nval/cat/0.png\ta cat\n")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    return tmp_path


@pytest.mark.parametrize(
    "args, key",
    [
        (["--zeroshot-frequency", "-1"], "run.zeroshot_frequency"),
        (["--zeroshot-dir", "{tmp}/nowhere"], "data.zeroshot_dir"),
        (["--zeroshot-dir", "{tmp}/val", "--zeroshot-classnames", "{tmp}/three.txt"], "data.zeroshot_classnames"),
        (["--zeroshot-dir", "{tmp}/val", "--zeroshot-templates", "{tmp}/three.txt"], "data.zeroshot_templates"),
        (["--zeroshot-classnames", "imagenet"], "data.zeroshot_classnames"),
        (["--retrieval-data", "{tmp}/missing.csv"], "data.retrieval_data"),
        (["--retrieval-data", "{tmp}/train.csv", "--set", "data.caption_key=caption"], "data.retrieval_data"),
        (["--eval-dir", "{tmp}/val"], "data.eval_dir"),
    ],
)
def test_bad_eval_settings_exit_2_naming_the_key(layout, args, key, capsys):
    argv = ["--train-data", str(layout / "train.csv"), "--set", "data.synth_dir="]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + [arg.format(tmp=layout) for arg in args])
    assert exit_info.value.code == 2
    assert key in capsys.readouterr().err


def test_eval_settings_load_into_a_suite(layout):
    config = load(
        None,
        {
            "data.zeroshot_dir": str(layout / "val"),
            "data.zeroshot_templates": "simple",
            "data.retrieval_data": str(layout / "train.csv"),
            "run.zeroshot_frequency": "2",
        },
    )
    assert config.run.zeroshot_frequency == 2
    suite = suite_from_data(config.data)
    assert suite.zero_shot_task.classnames == ("cat", "dog") and len(suite.zero_shot_task.templates) > 1
    assert suite.retrieval_csv.path == layout / "train.csv" and suite.synth_dir is None
    assert suite_from_data(load(None, {}).data) is None  # nothing to evaluate: no eval at all


def test_the_synth_eval_dir_may_be_generated_by_the_run(tmp_path):
    """data.eval_dir naming data.synth_dir is not checked up front: the run writes it before evaluating."""
    from helip.trainer.tools.eval import check_data_sources

    config = load(None, {"data.synth_dir": str(tmp_path / "synth"), "data.eval_dir": str(tmp_path / "synth")})
    check_data_sources(config.data)
    with pytest.raises(ValueError, match="data.eval_dir"):
        suite_from_data(config.data)


def test_zeroshot_frequency_is_checked_in_the_config():
    with pytest.raises(ValueError, match="run.zeroshot_frequency"):
        RunConfig(zeroshot_frequency=-2)
