"""Bad samples: a missing file, an image that does not decode or an empty caption is stepped over, counted, and
fatal only past the configured fraction."""

from __future__ import annotations

import csv
import pickle

import open_clip
import pytest
import torch
from torchvision import transforms

from helip.trainer.pairs.data import BadSampleError, CsvPairs, PairBatch, collate_pairs
from helip.trainer.pairs.ledger import BadSampleLedger, TooManyBadSamples
from helip.trainer.tools.synth import SynthConfig, generate

TRANSFORM = transforms.ToTensor()
TOKENIZE = open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A 30-sample CSV where id 3's image is missing, id 7's is garbage bytes and id 11's caption is blank."""
    root = tmp_path_factory.mktemp("damaged")
    generate(SynthConfig(root, train_size=30, test_size=2, seed=5))
    rows = list(csv.DictReader(open(root / "train.csv"), delimiter="\t"))
    (root / rows[3]["filepath"]).unlink()
    (root / rows[7]["filepath"]).write_bytes(b"not an image at all")
    rows[11]["title"] = "   "
    with open(root / "damaged.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return root / "damaged.csv"


def test_a_bad_sample_is_replaced_by_a_good_one_and_reported(damaged):
    dataset = CsvPairs(damaged, TRANSFORM, TOKENIZE)
    for bad_id, kind in ((3, "missing_file"), (7, "unreadable_image"), (11, "empty_caption")):
        sample = dataset[bad_id]
        assert sample.id not in (3, 7, 11)  # the substitute's own id: its embedding goes to its own row
        assert sample.skipped[0].id == bad_id and sample.skipped[0].kind == kind
        assert dataset[bad_id].id == sample.id  # deterministic
        assert torch.equal(dataset[sample.id][1], sample[1])
    good = dataset[4]
    assert good.id == 4 and good.skipped == ()
    clone = pickle.loads(pickle.dumps(dataset[7]))  # what DataLoader workers send back
    assert clone.id == dataset[7].id and clone.skipped[0].kind == "unreadable_image"


def test_collate_keeps_the_batch_size_and_lists_the_skipped(damaged):
    dataset = CsvPairs(damaged, TRANSFORM, TOKENIZE)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[[1, 3, 7, 11, 12]], collate_fn=collate_pairs)
    batch = next(iter(loader))
    assert isinstance(batch, PairBatch) and len(batch) == 5 and batch.images.shape[0] == 5
    assert sorted(b.id for b in batch.skipped) == [3, 7, 11]
    assert batch.ids.tolist()[0] == 1 and batch.ids.tolist()[4] == 12


def test_an_evaluation_set_refuses_bad_samples(damaged):
    dataset = CsvPairs(damaged, TRANSFORM, TOKENIZE)
    dataset.max_substitutes = 0
    with pytest.raises(BadSampleError, match="3 and 0 substitutes are all bad"):
        dataset[3]


def _batch(n: int, bad: int) -> PairBatch:
    from helip.trainer.pairs.data import BadSample

    return PairBatch(
        torch.arange(n),
        torch.zeros(n, 3, 2, 2),
        torch.zeros(n, 4, dtype=torch.long),
        [BadSample(100 + i, "missing_file", "gone") for i in range(bad)],
    )


def test_ledger_counts_and_stops_past_the_fraction(caplog):
    seen = []
    ledger = BadSampleLedger(max_fraction=0.1, min_samples=50, on_bad=lambda b: seen.append(b.kind), log_first=2)
    ledger.record(_batch(10, 5))  # 33% bad, but too few samples to judge
    assert ledger.bad == 5 and len(seen) == 5 and ledger.by_kind == {"missing_file": 5}
    assert "skipped bad sample 100 (missing_file)" in caplog.text and "sample 102" not in caplog.text
    ledger.record(_batch(40, 0))
    ledger.record(_batch(40, 0))  # 5 of 95: under 10%
    with pytest.raises(TooManyBadSamples, match=r"data.max_bad_fraction=10.0%.*missing_file"):
        ledger.record(_batch(10, 10))  # 15 of 115
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadSampleLedger(max_fraction=1.5)
