"""Loading user-laid-out evaluation data: ImageFolder classes, class names, templates, retrieval CSVs, the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)
from PIL import Image

from helip.trainer.tools import eval_tasks
from helip.trainer.tools.eval_tasks import EvalDataError
from helip.trainer.tools.probe import ProbeConfig


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def _folders(root: Path, classes: dict[str, int]) -> Path:
    """ROOT/<class>/<i>.png, `classes[name]` images each."""
    for name, count in classes.items():
        for i in range(count):
            _png(root / name / f"{i}.png")
    return root


def test_folder_names_are_the_default_class_names_in_sorted_order(tmp_path):
    root = _folders(tmp_path / "set", {"tabby_cat": 2, "dog": 1, "ant": 1})
    task = eval_tasks.image_folder_task(root)
    assert task.classnames == ("ant", "dog", "tabby cat")
    assert task.templates == eval_tasks.DEFAULT_TEMPLATES
    assert sorted(task.labels) == [0, 1, 2, 2]
    assert all(
        path.parent.name == ["ant", "dog", "tabby_cat"][label] for path, label in zip(task.image_paths, task.labels)
    )
    assert task.prompts()[:2] == ["a photo of a ant.", "a photo of a dog."]


@pytest.mark.parametrize(
    "text",
    ["cheetah\n\nbeetle\n", json.dumps(["cheetah", "beetle"]), json.dumps({"b": "beetle", "a": "cheetah"})],
    ids=["lines", "json-list", "json-folder-map"],
)
def test_classnames_file_forms(tmp_path, text):
    root = _folders(tmp_path / "set", {"a": 1, "b": 1})
    (tmp_path / "names").write_text(text)
    assert eval_tasks.image_folder_task(root, str(tmp_path / "names")).classnames == ("cheetah", "beetle")


def test_imagenet_names_follow_sorted_wnid_folders(tmp_path):
    """1000 folders in sorted order get open_clip's 1000 names in order; an image's label picks its folder's name."""
    root = tmp_path / "imagenet"
    source = _png(tmp_path / "one.png")
    wnids = [f"n{index * 7 + 1000:08d}" for index in range(1000)]  # sorted, like ImageNet's wnids
    for wnid in reversed(wnids):  # creation order must not matter
        (root / wnid).mkdir(parents=True)
        (root / wnid / "x.png").write_bytes(source.read_bytes())
    task = eval_tasks.image_folder_task(root, "imagenet")
    assert len(task.classnames) == 1000
    assert task.classnames[0] == "tench" and task.classnames[-1] == "toilet paper"
    by_folder = {path.parent.name: task.classnames[label] for path, label in zip(task.image_paths, task.labels)}
    assert by_folder[wnids[417]] == IMAGENET_CLASSNAMES[417]
    # ImageNet names bring open_clip's 80 OpenAI templates unless templates are given.
    assert len(task.templates) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert task.templates[0] == OPENAI_IMAGENET_TEMPLATES[0]("{}")


def test_imagenet_names_need_a_thousand_folders(tmp_path):
    root = _folders(tmp_path / "set", {"n01440764": 1, "n01443537": 1})
    with pytest.raises(EvalDataError, match="1000 class names for 2 class folders") as error:
        eval_tasks.image_folder_task(root, "imagenet")
    assert error.value.field == "classnames"


def test_template_sets_and_files(tmp_path):
    assert eval_tasks.read_templates("simple") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert eval_tasks.read_templates("simple")[0] == "itap of a {}."
    assert all("{}" in t for t in eval_tasks.read_templates("openai"))
    (tmp_path / "t.txt").write_text("a {} shape.\nan image of a {}.\n")
    assert eval_tasks.read_templates(str(tmp_path / "t.txt")) == ["a {} shape.", "an image of a {}."]
    (tmp_path / "t.json").write_text(json.dumps(["{}!"]))
    assert eval_tasks.read_templates(str(tmp_path / "t.json")) == ["{}!"]


@pytest.mark.parametrize(
    "classnames, templates, field, message",
    [
        ("names3", "", "classnames", "3 class names for 2 class folders"),
        ("", "no_braces", "templates", "needs '{}'"),
        ("", "missing.txt", "templates", "cannot read"),
        ("", "object.json", "templates", "JSON object"),
        ("badjson", "", "classnames", "not valid JSON"),
    ],
)
def test_bad_names_and_templates_name_their_field(tmp_path, classnames, templates, field, message):
    root = _folders(tmp_path / "set", {"a": 1, "b": 1})
    (tmp_path / "names3").write_text("x\ny\nz\n")
    (tmp_path / "no_braces").write_text("a photo of a thing.\n")
    (tmp_path / "object.json").write_text(json.dumps({"a": "{}"}))
    (tmp_path / "badjson").write_text("[1, ")

    def path(name: str) -> str:
        return str(tmp_path / name) if name else ""

    with pytest.raises(EvalDataError, match=message) as error:
        eval_tasks.image_folder_task(root, path(classnames), path(templates))
    assert error.value.field == field


def test_a_directory_without_class_folders_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(EvalDataError) as error:
            eval_tasks.image_folder_task(root)
        assert error.value.field == "zeroshot_dir"


def test_suite_checks_every_source(tmp_path):
    root = _folders(tmp_path / "val", {"a": 2, "b": 2})
    _folders(tmp_path / "train", {"a": 1, "b": 1})
    _folders(tmp_path / "other", {"a": 1, "c": 1})
    (tmp_path / "pairs.csv").write_text("img,text\nval/a/0.png,a red square\n")

    suite = eval_tasks.load_suite(
        zeroshot_dir=root,
        retrieval_data=tmp_path / "pairs.csv",
        img_key="img",
        caption_key="text",
        sep=",",
        probe=ProbeConfig(),
        probe_train_dir=tmp_path / "train",
    )
    assert suite.zero_shot_task.classnames == ("a", "b")
    assert len(suite.probe_train_task.labels) == 2
    assert suite.retrieval_csv == eval_tasks.RetrievalCsv(tmp_path / "pairs.csv", "img", "text", ",")

    def field_of(**kwargs) -> str:
        with pytest.raises(EvalDataError) as error:
            eval_tasks.load_suite(**kwargs)
        return error.value.field

    assert field_of() == "synth_dir"  # nothing to evaluate
    assert field_of(synth_dir=tmp_path) == "synth_dir"  # no zeroshot.json
    assert field_of(retrieval_data=tmp_path / "pairs.csv") == "retrieval_data"  # default columns absent
    assert field_of(retrieval_data=tmp_path / "nope.csv") == "retrieval_data"
    assert (
        field_of(retrieval_data=tmp_path / "pairs.csv", sep=",", img_key="img", caption_key="text", probe=ProbeConfig())
        == "probe"
    )
    assert field_of(zeroshot_dir=root, probe=ProbeConfig(), probe_train_dir=tmp_path / "other") == "probe_train_dir"
    assert field_of(zeroshot_dir=root, probe_train_dir=tmp_path / "train") == "probe_train_dir"  # no probe asked
    assert field_of(retrieval_data=tmp_path / "pairs.csv", classnames="imagenet") == "classnames"
