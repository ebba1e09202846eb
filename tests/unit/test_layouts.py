"""Every batch's layout is exact: its couples are rows of that very batch holding an anchor and the hard pair
mined for it, through DataLoader worker processes, bad-sample substitutes, a resumed iterator and two iterators
at once.

The scripted miner answers anchor a with (a + N/2) mod N, so the couples a step must carry follow from its
anchors alone (the composer puts anchor i at row 2i and its hard pair at row 2i + 1), not from how the sampler
says it composed the batch."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from PIL import Image

from helip.trainer.pairs.data import BadSampleError, PairDataset
from helip.trainer.pairs.hard_pairs import HardPairSampler, hard_pair_loader
from helip.trainer.pairs.ledger import BadSampleLedger
from helip.trainer.pairs.session import MiningSession
from tests.unit.test_hard_pairs import CONFIG, N, ScriptedMiner

BATCH = 8  # 4 anchors, 4 hard slots
HARD = BATCH // 2
STEP_S = 0.01  # the training step: lets the answers for the batches ahead arrive


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def _tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[int(caption.split()[-1])] for caption in captions])


class TinyPairs(PairDataset):
    """N tiny samples (a 2x2 image, one token: the id); those in `bad` fail to load. Module-level so that
    DataLoader workers started by forkserver can unpickle it."""

    def __init__(self, bad: frozenset[int] = frozenset()):
        self.bad = bad
        self.transform = _to_tensor
        self.tokenize = _tokenize

    def __len__(self) -> int:
        return N

    def load(self, i: int) -> tuple[Image.Image, str]:
        if i in self.bad:
            raise BadSampleError("missing_file", f"sample {i} is gone")
        return Image.new("RGB", (2, 2), (i % 256, 0, 0)), f"caption {i}"


def partner(anchor_id: int) -> int:
    return (anchor_id + N // 2) % N


def expected_couples(sampler: HardPairSampler, step: int, bad: frozenset[int], minable: int) -> list[list[int]]:
    """(anchor row, hard row) of each of the first `minable` anchors whose hard pair could be mined (it is not an
    anchor of the batch itself) and delivered (neither row a bad sample's substitute)."""
    anchors = sampler.anchors.anchors(step).tolist()
    return [
        [2 * i, 2 * i + 1]
        for i, anchor in enumerate(anchors[:minable])
        if partner(anchor) not in anchors and anchor not in bad and partner(anchor) not in bad
    ]


def assert_exact(batch, sampler: HardPairSampler, bad: frozenset[int] = frozenset(), minable: int = HARD) -> None:
    """The batch's layout names its own step's anchors and mined pairs, at rows that hold them; `minable`: hard
    slots mining was meant to fill (fewer while streaming mode ramps in)."""
    layout = sampler.layout(batch)
    anchors = sampler.anchors.anchors(layout.step).tolist()
    delivered = batch.ids.tolist()
    assert layout.ids[0::2].tolist() == anchors, f"step {layout.step}: the layout is another batch's"
    assert all(delivered[2 * i] == a for i, a in enumerate(anchors) if a not in bad)
    couples = layout.couples.tolist()
    assert couples == expected_couples(sampler, layout.step, bad, minable), f"step {layout.step}"
    assert all(delivered[h] == partner(delivered[a]) for a, h in couples)
    assert (layout.n_hard, layout.n_fallback, layout.n_plain) == (len(couples), minable - len(couples), HARD - minable)


def _session() -> MiningSession:
    return MiningSession(CONFIG, client=ScriptedMiner())


def test_layouts_are_exact_through_dataloader_workers():
    sampler = HardPairSampler(N, BATCH, _session(), num_workers=2, prefetch_factor=2, steps=10, seed=3)
    loader = hard_pair_loader(TinyPairs(), sampler, pin_memory=False)
    assert loader.multiprocessing_context.get_start_method() in ("forkserver", "spawn")
    steps = []
    for batch in loader:
        time.sleep(STEP_S)
        assert_exact(batch, sampler)
        steps.append(batch.layout.step)
    sampler.close()
    assert steps == list(range(10))


def test_couples_on_a_substituted_row_are_dropped_and_counted():
    sampler = HardPairSampler(N, BATCH, _session(), steps=4, seed=3)
    # Step 1: the first anchor's hard pair is missing; step 2: the third anchor itself.
    bad = frozenset({partner(int(sampler.anchors.anchors(1)[0])), int(sampler.anchors.anchors(2)[2])})
    ledger = BadSampleLedger(max_fraction=0.5, min_samples=1)
    lost = {}
    for batch in hard_pair_loader(TinyPairs(bad), sampler, pin_memory=False):
        time.sleep(STEP_S)
        assert_exact(batch, sampler, bad)
        ledger.record(batch)
        lost[batch.layout.step] = batch.layout.n_fallback
    sampler.close()
    assert lost == {0: 0, 1: 1, 2: 1, 3: 0}  # one couple lost to each bad sample, as a fallback slot
    assert ledger.bad == 2 and ledger.by_kind == {"missing_file": 2}


def _ramped_run(start_step: int) -> list[tuple]:
    """Steps start_step..8 in streaming mode: mining starts at step 2 and ramps in over 4 steps (one more hard
    slot mined each step), so a resume at step 4 lands mid-ramp."""
    config = dataclasses.replace(CONFIG, start_step=2, ramp_steps=4)
    session = MiningSession(config, client=ScriptedMiner())
    sampler = HardPairSampler(N, BATCH, session, steps=9, seed=3, start_step=start_step)
    seen = []
    for batch in hard_pair_loader(TinyPairs(), sampler, pin_memory=False):
        time.sleep(STEP_S)
        layout = batch.layout
        assert_exact(batch, sampler, minable=min(HARD, max(0, layout.step - 1)))
        seen.append((layout.step, batch.ids.tolist(), layout.couples.tolist(), layout.n_hard, layout.n_fallback))
    sampler.close()
    return seen


def test_a_resumed_iterator_yields_the_batches_of_the_uninterrupted_one():
    whole = _ramped_run(0)
    assert [step for step, *_ in whole] == list(range(9))
    assert _ramped_run(4) == whole[4:]


def test_two_live_iterators_each_carry_their_own_layouts():
    sampler = HardPairSampler(N, BATCH, _session(), steps=6, seed=3)
    loader = hard_pair_loader(TinyPairs(), sampler, pin_memory=False)
    first = iter(loader)
    steps = {"first": [next(first).layout.step, next(first).layout.step], "second": []}
    second = iter(loader)
    for _ in range(4):
        for name, iterator in (("second", second), ("first", first)):
            time.sleep(STEP_S)
            batch = next(iterator)
            assert_exact(batch, sampler)
            steps[name].append(batch.layout.step)
    sampler.close()
    assert steps == {"first": list(range(6)), "second": list(range(4))}
