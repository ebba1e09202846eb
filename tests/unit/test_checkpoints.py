"""Keeping the newest N resumable checkpoints: which step_N directories go, and which never do."""

from __future__ import annotations

from pathlib import Path

import pytest

from helip.trainer.app.checkpoints import prune_resumable, resumable_checkpoints


def make_checkpoints(directory: Path, steps: list[int], latest: int | None = None) -> None:
    for step in steps:
        (directory / f"step_{step}").mkdir(parents=True)
        (directory / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if latest is not None:
        (directory / "latest").write_text(f"step_{latest}")


def names(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def test_newest_steps_are_kept_by_step_number_not_by_name(tmp_path):
    make_checkpoints(tmp_path, [5, 100, 20, 3, 40], latest=100)
    (tmp_path / "my-tag").mkdir()  # a tag the user saved by hand
    deleted = prune_resumable(tmp_path, keep=3)
    assert names(deleted) == ["step_3", "step_5"]
    assert names(resumable_checkpoints(tmp_path)) == ["step_20", "step_40", "step_100"]
    assert (tmp_path / "my-tag").is_dir() and (tmp_path / "latest").read_text() == "step_100"


def test_keep_zero_keeps_all_and_fewer_than_keep_deletes_none(tmp_path):
    make_checkpoints(tmp_path, [1, 2, 3, 4], latest=4)
    assert prune_resumable(tmp_path, keep=0) == []
    assert prune_resumable(tmp_path, keep=10) == []
    assert len(resumable_checkpoints(tmp_path)) == 4


def test_the_latest_tag_survives_even_when_older_than_the_rest(tmp_path):
    # A run resumed from step_2 and saved nothing yet: `latest` names an old tag beside newer ones.
    make_checkpoints(tmp_path, [2, 4, 6], latest=2)
    assert names(prune_resumable(tmp_path, keep=1)) == ["step_4"]
    assert names(resumable_checkpoints(tmp_path)) == ["step_2", "step_6"]


def test_missing_directory_and_negative_keep(tmp_path):
    assert resumable_checkpoints(tmp_path / "absent") == []
    with pytest.raises(ValueError, match="keep"):
        prune_resumable(tmp_path, keep=-1)
