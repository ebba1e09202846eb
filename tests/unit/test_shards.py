"""Shards as img2dataset writes them: ids in key order whatever the write order, keys kept, and the samples it left
out counted from its stats (or the key gaps), never fatal. Shards written here by hand in img2dataset's layout; the
real img2dataset runs in tests/integration/test_img2dataset.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from torchvision import transforms

from helip.trainer.pairs.data import WebDatasetPairs, open_pairs
from helip.trainer.pairs.shards import ShardCensus, index_shards

TRANSFORM = transforms.ToTensor()


def tokenize(captions: list[str]):
    import torch

    return torch.tensor([[len(c)] for c in captions])


def write_shard(path: Path, keys: list[str], stats: dict | None = None) -> None:
    """An img2dataset shard: key.jpg, key.txt ("caption KEY") and key.json per sample, members in `keys` order."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            image = io.BytesIO()
            Image.new("RGB", (4, 4), (int(key) % 256, 0, 0)).save(image, format="JPEG")
            meta = json.dumps({"key": key, "status": "success", "url": f"http://x/{key}.jpg"}).encode()
            members = {"jpg": image.getvalue(), "txt": f"caption {key}".encode(), "json": meta}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if stats is not None:
        path.with_name(f"{path.stem}_stats.json").write_text(json.dumps(stats))


def stats(count: int, successes: int, failed_to_download: int = 0, failed_to_resize: int = 0, **errors: int) -> dict:
    return {
        "count": count,
        "successes": successes,
        "failed_to_download": failed_to_download,
        "failed_to_resize": failed_to_resize,
        "status_dict": {"success": successes, **{m.replace("_", " "): n for m, n in errors.items()}},
    }


def test_ids_follow_the_keys_not_the_write_order(tmp_path):
    # Download threads finish in any order: the same samples written in another order get the same ids.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_shard(tmp_path / "a" / "00000.tar", ["000004", "000001", "000007", "000000"], stats(8, 4, 4))
    write_shard(tmp_path / "a" / "00001.tar", ["000012", "000010"], stats(8, 2, 6))
    write_shard(tmp_path / "b" / "00000.tar", ["000000", "000007", "000004", "000001"], stats(8, 4, 4))
    write_shard(tmp_path / "b" / "00001.tar", ["000010", "000012"], stats(8, 2, 6))
    a = open_pairs(str(tmp_path / "a" / "{00000..00001}.tar"), TRANSFORM, tokenize)
    b = open_pairs(str(tmp_path / "b" / "{00000..00001}.tar"), TRANSFORM, tokenize)
    assert isinstance(a, WebDatasetPairs) and len(a) == len(b) == 6
    keys = ["000000", "000001", "000004", "000007", "000010", "000012"]
    assert [a.key(i) for i in range(6)] == [b.key(i) for i in range(6)] == keys
    assert [a.caption(i) for i in range(6)] == [f"caption {k}" for k in keys]
    sample_id, image, _ = a[4]
    assert sample_id == 4 and image[0, 0, 0] == pytest.approx(10 / 255, abs=0.03)  # the JPEG of key 000010


def test_failed_downloads_are_counted_from_the_stats(tmp_path, caplog):
    write_shard(tmp_path / "00000.tar", ["000000", "000002"], stats(4, 2, 1, 1, HTTP_Error_404=1, decoding=1))
    write_shard(tmp_path / "00001.tar", ["000010", "000011", "000012", "000013"], stats(4, 4))
    with caplog.at_level("INFO", logger="helip.trainer.pairs.data"):
        dataset = WebDatasetPairs(str(tmp_path / "{00000..00001}.tar"), TRANSFORM, tokenize)
    census = dataset.census
    assert (census.shards, census.samples, census.attempted, census.n_missing) == (2, 6, 8, 2)
    assert dict(census.missing) == {"failed_to_download": 1, "failed_to_resize": 1}
    assert dict(census.errors) == {"HTTP Error 404": 1, "decoding": 1}
    line = "2 of 8 samples in these shards failed to download (failed_to_download 1, failed_to_resize 1)"
    assert line in caplog.text and "training on the other 6 samples in 2 shards" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"
    assert dataset.describe() == {
        "shards": 2,
        "samples": 6,
        "attempted": 8,
        "missing": 2,
        "missing_by_kind": {"failed_to_download": 1, "failed_to_resize": 1},
        "errors": {"HTTP Error 404": 1, "decoding": 1},
        "shards_without_stats": 0,
    }


def test_without_stats_the_key_gaps_are_counted(tmp_path):
    # Shard 3 of 100 a shard: keys 00003 + two digits. Rows 1, 2 and 5 are gaps; rows after 6 cannot be seen.
    write_shard(tmp_path / "00003.tar", ["0000306", "0000300", "0000303", "0000304"])
    _, census = index_shards([str(tmp_path / "00003.tar")])
    assert dict(census.missing) == {"key_gap": 3} and census.shards_without_stats == 1
    assert "lower bound" in census.describe()


def test_a_success_the_tar_lacks_is_counted_and_keys_of_another_form_are_not_gaps(tmp_path):
    write_shard(tmp_path / "00000.tar", ["000000", "000001"], stats(3, 3))  # a shard cut short after its stats
    (tmp_path / "other").mkdir()
    write_shard(tmp_path / "other" / "shard-000000.tar", ["7", "9"])  # not img2dataset's: no gaps to speak of
    _, census = index_shards([str(tmp_path / "00000.tar"), str(tmp_path / "other" / "shard-000000.tar")])
    assert dict(census.missing) == {"not_in_tar": 1}
    assert census.samples == 4 and census.shards_without_stats == 1


def test_unreadable_stats_are_not_fatal(tmp_path, caplog):
    write_shard(tmp_path / "00000.tar", ["000000", "000003"])
    (tmp_path / "00000_stats.json").write_text("{not json")
    _, census = index_shards([str(tmp_path / "00000.tar")])
    assert dict(census.missing) == {"key_gap": 2}
    assert "unreadable img2dataset stats" in caplog.text


def test_census_adds_up_and_says_nothing_missing():
    both = ShardCensus(1, 5) + ShardCensus(1, 7)
    assert (both.shards, both.samples, both.attempted) == (2, 12, 12)
    assert both.describe() == "12 samples in 2 shards, none missing (img2dataset's stats)"
