"""The bootstrap pass says where its time went (data, encoding with the first batch apart, pushing, the flush):
the breakdown a slow bootstrap on a GPU machine is read from."""

from __future__ import annotations

import logging

import torch

from helip.trainer.pairs.bootstrap import BootstrapTiming, bootstrap_index


class TinyPairs(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return i, torch.full((3, 4, 4), float(i)), torch.full((5,), i, dtype=torch.long)


class TwoTowers(torch.nn.Module):
    def forward(self, images, tokens):
        return images.flatten(1)[:, :8], tokens.float().repeat(1, 2)[:, :8]


class Recorder:
    """Takes pushes as a pusher does (block, timeout) and records them."""

    def __init__(self):
        self.rows: list[int] = []
        self.flushed = False

    def push(self, ids, image, text, step, block=False, timeout_s=None):
        assert image.shape == text.shape == (len(ids), 8)
        self.rows.extend(ids.tolist())
        return True

    def flush(self, timeout_s):
        self.flushed = True


def test_the_pass_pushes_its_share_and_logs_the_breakdown(caplog):
    pusher = Recorder()
    with caplog.at_level(logging.INFO, logger="helip.trainer.pairs.bootstrap"):
        pushed = bootstrap_index(TwoTowers(), TinyPairs(), pusher, rank=1, world_size=2, batch_size=2, progress=False)
    assert pushed == 5 and pusher.rows == [1, 3, 5, 7, 9] and pusher.flushed
    (line,) = [r.getMessage() for r in caplog.records if "bootstrap rows" in r.getMessage()]
    for part in ("waiting for data", "encoding", "3 batches, the first", "pushing", "final flush"):
        assert part in line, line


def test_the_first_batch_is_counted_apart_and_in_the_total():
    timing = BootstrapTiming()
    for seconds in (2.0, 0.5, 0.5):
        timing.note_encode(seconds)
    assert timing.first_encode_s == 2.0 and timing.encode_s == 3.0 and timing.batches == 3
