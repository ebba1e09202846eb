"""Pair datasets: stable ids, random access, CSV and webdataset agree, collate shapes, errors that name the problem."""

from __future__ import annotations

import io
import pickle
import tarfile

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from helip.trainer.pairs.data import CsvPairs, WebDatasetPairs, collate, open_pairs, read_pairs
from helip.trainer.tools import synth
from helip.trainer.tools.synth import SynthConfig, generate, write_shards

TRANSFORM = transforms.ToTensor()
TOKENIZE = open_clip.get_tokenizer("ViT-B-32")  # offline: the BPE vocabulary ships inside open_clip


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    return generate(SynthConfig(tmp_path_factory.mktemp("synth"), train_size=23, test_size=5, seed=11))


@pytest.fixture(scope="module")
def shards(synth_set, tmp_path_factory):
    return write_shards(synth_set.train_csv, tmp_path_factory.mktemp("wds"), shard_size=7)


def _assert_same_sample(a, b):
    assert a[0] == b[0]
    assert torch.equal(a[1], b[1])
    assert torch.equal(a[2], b[2])


def test_open_clip_tokenizer_works_offline():
    tokens = TOKENIZE(["a small red circle", "a large blue square"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert not torch.equal(tokens[0], tokens[1])


def test_csv_pairs_random_access(synth_set):
    dataset = CsvPairs(synth_set.train_csv, TRANSFORM, TOKENIZE)
    pairs = read_pairs(synth_set.train_csv)
    assert len(dataset) == 23
    for i in (17, 0, 22, 5):
        sample_id, image, tokens = dataset[i]
        assert sample_id == i
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert torch.equal(image, TRANSFORM(Image.open(pairs[i][0]).convert("RGB")))
        assert torch.equal(tokens, TOKENIZE([pairs[i][1]])[0])
        assert dataset.caption(i) == pairs[i][1]


def test_csv_absolute_paths_resolve_the_same(synth_set, tmp_path):
    """Relative paths are relative to the CSV's directory; absolute paths work from anywhere."""
    elsewhere = tmp_path / "lists" / "abs.tsv"
    elsewhere.parent.mkdir()
    lines = synth_set.train_csv.read_text(encoding="utf-8").splitlines()
    rows = [lines[0]] + [
        f"{synth_set.root / path}\t{title}" for path, title in (line.split("\t") for line in lines[1:])
    ]
    elsewhere.write_text("\n".join(rows) + "\n", encoding="utf-8")
    relative = CsvPairs(synth_set.train_csv, TRANSFORM, TOKENIZE)
    absolute = open_pairs(elsewhere, TRANSFORM, TOKENIZE)
    assert isinstance(absolute, CsvPairs)
    _assert_same_sample(relative[9], absolute[9])


def test_csv_custom_columns_and_missing_column(synth_set, tmp_path):
    custom = tmp_path / "custom.csv"
    custom.write_text(f"caption,image\na red circle,{synth_set.root / 'images/train_000000.png'}\n")
    dataset = CsvPairs(custom, TRANSFORM, TOKENIZE, img_key="image", caption_key="caption", sep=",")
    assert dataset.caption(0) == "a red circle"
    with pytest.raises(ValueError, match="missing column.*'filepath'"):
        CsvPairs(custom, TRANSFORM, TOKENIZE, sep=",")


def test_wds_random_access_equals_csv(synth_set, shards):
    assert [s.name for s in shards] == [f"shard-{k:06d}.tar" for k in range(4)]  # 7 + 7 + 7 + 2
    csv_pairs = CsvPairs(synth_set.train_csv, TRANSFORM, TOKENIZE)
    pattern = str(shards[0].parent / "shard-{000000..000003}.tar")
    wds_pairs = open_pairs(pattern, TRANSFORM, TOKENIZE)
    assert isinstance(wds_pairs, WebDatasetPairs)
    assert len(wds_pairs) == len(csv_pairs) == 23
    for i in (22, 3, 14, 7, 0, 6, 21, 7):  # across shards, backwards, repeated
        _assert_same_sample(wds_pairs[i], csv_pairs[i])
        assert wds_pairs.caption(i) == csv_pairs.caption(i)
    wds_pairs.close()


def test_wds_shards_carry_the_id(shards):
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000007.png", "000000007.txt", "000000007.id"]
        assert tar.extractfile("000000008.id").read() == b"8"


def test_wds_from_list_in_given_order(synth_set, shards):
    """Ids follow the order of the shard list: reversing the list moves the last shard's samples first."""
    forward = WebDatasetPairs([str(s) for s in shards], TRANSFORM, TOKENIZE)
    backward = open_pairs([str(s) for s in reversed(shards)], TRANSFORM, TOKENIZE)
    assert len(backward) == 23
    assert backward.caption(0) == forward.caption(21)
    assert backward[1][0] == 1 and torch.equal(backward[1][1], forward[22][1])


def test_wds_survives_pickling_for_workers(shards):
    dataset = WebDatasetPairs([str(s) for s in shards], TRANSFORM, TOKENIZE)
    first = dataset[12]  # opens a handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(dataset))
    _assert_same_sample(clone[12], first)


def test_wds_sample_without_caption_is_named(tmp_path):
    shard = tmp_path / "bad.tar"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("orphan.png")
        info.size = len(buffer.getvalue())
        tar.addfile(info, io.BytesIO(buffer.getvalue()))
    with pytest.raises(ValueError, match="'orphan'.*\\.txt caption"):
        WebDatasetPairs(str(shard), TRANSFORM, TOKENIZE)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        WebDatasetPairs(str(tmp_path / "missing.tar"), TRANSFORM, TOKENIZE)


def test_open_pairs_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the data format of .*data.parquet"):
        open_pairs(str(tmp_path / "data.parquet"), TRANSFORM, TOKENIZE)


def test_collate_shapes_through_a_loader(synth_set):
    dataset = CsvPairs(synth_set.train_csv, TRANSFORM, TOKENIZE)
    ids, images, tokens = collate([dataset[i] for i in (4, 19, 2)])
    assert ids.dtype == torch.long and ids.tolist() == [4, 19, 2]
    assert images.shape == (3, 3, 32, 32)
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    sampler = [[20, 1], [8]]  # batches of arbitrary ids, the way the batch composer will ask
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    assert [batch[0].tolist() for batch in loader] == [[20, 1], [8]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_wds_cli_writes_shards(synth_set, tmp_path, capsys):
    out = tmp_path / "cli"
    code = synth.main(["wds", "--csv", str(synth_set.test_csv), "--out", str(out), "--shard-size", "2"])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert "shard-000002.tar" in capsys.readouterr().out
