"""Mines, copies and writes that interleave: what a Mine returns and what a copy holds when rows move meanwhile.

Each test pauses a Mine (or a copy) between blocks at a known point, writes, and lets it finish: deterministic,
no sleeps.
"""

import threading

import numpy as np
import pytest

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import IvfConfig, SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.rwlock import ReadWriteLock
from tests.reference import random_pairs, reference_mine
from tests.unit.test_block_store import DIM, WAIT_S, PausedMine, make_miner, put, run_with_timeout

IDS = np.uint64


def test_an_id_deleted_and_reinserted_further_on_during_a_mine_is_returned_once():
    rng = np.random.default_rng(11)
    miner, rows = make_miner(), {}  # blocks of 8 rows, one chunk a block
    put(miner, rows, rng, range(24))  # blocks 0..2
    anchor_image, anchor_text = rows[0]
    near = (anchor_image[None] * 0.99, anchor_text[None] * 0.99)
    miner.upsert(np.array([1], dtype=IDS), *near, 1)  # row 1 (block 0) is the anchor's nearest neighbour
    query = MineQuery(4, anchor_ids=np.array([0], dtype=IDS), max_similarity=2.0)
    mine = PausedMine(miner, query, pause_before_chunk=2)  # block 0 scored: row 1 is among the candidates
    # Deleting 1 and 20 frees slots 1 and 20; re-inserting 1 takes slot 20, in block 2, which the Mine scores next.
    run_with_timeout(lambda: miner.delete(np.array([1, 20], dtype=IDS)))
    run_with_timeout(lambda: miner.upsert(np.array([1], dtype=IDS), *near, 2))
    assert miner.store.slots_of(np.array([1], dtype=IDS))[0] // miner.store.block_rows == 2
    result = mine.finish()
    returned = result.neighbour_ids[0][result.neighbour_ids[0] >= 0].tolist()
    assert returned[0] == 1
    assert len(returned) == len(set(returned)), f"an id came back twice: {returned}"


def copy_all_while(miner, paused_at_block: int, writes):
    """miner.copy_rows() in a thread, held before block `paused_at_block` while `writes()` runs in this one."""
    copied = {}
    blocker = miner.store.blocks()[paused_at_block].lock
    with blocker.write():
        copier = threading.Thread(target=lambda: copied.update(rows=miner.copy_rows()), daemon=True)
        copier.start()
        assert blocker.wait_for_readers(1, WAIT_S), "the copy never reached the held block"
        writes()
    copier.join(WAIT_S)
    assert not copier.is_alive()
    return copied["rows"]


def test_a_copy_taken_while_an_id_moves_holds_it_once_and_restores_with_the_log_to_the_same_rows():
    rng = np.random.default_rng(12)
    miner, rows = make_miner(), {}
    put(miner, rows, rng, range(24))  # blocks 0..2
    moved_image, moved_text = random_pairs(rng, 1, DIM)

    def writes_after_the_offset(core):  # what a log replays after the snapshot's offset
        core.delete(np.array([1, 20], dtype=IDS))  # frees slots 1 (block 0) and 20 (block 2)
        core.upsert(np.array([1], dtype=IDS), moved_image, moved_text, 2)  # id 1 takes slot 20

    # Block 0 is copied with the old row 1; the copy then waits at block 1 while row 1 moves to block 2.
    ids, steps, image, text = copy_all_while(miner, 1, lambda: writes_after_the_offset(miner))
    assert sorted(ids.tolist()) == sorted(set(ids.tolist())), "an id is in the copy twice"
    assert set(ids.tolist()) == set(range(24)) - {20}

    restored = make_miner()  # restore as DurableMiner.recover does, then replay the log after the offset
    restored.upsert(ids, image, text, steps, enforce_max_rows=False)
    writes_after_the_offset(restored)
    assert restored.size == miner.size == 23
    for core in (miner, restored):
        found, image_now, _, steps_now = core.fetch(np.arange(24, dtype=IDS))
        assert found.tolist() == [i != 20 for i in range(24)]
        np.testing.assert_allclose(image_now[1], moved_image[0], rtol=1e-6)
        assert steps_now[1] == 2
    query = MineQuery(23, anchor_ids=np.array([0, 5], dtype=IDS), max_similarity=2.0)
    np.testing.assert_array_equal(miner.mine(query).neighbour_ids, restored.mine(query).neighbour_ids)


@pytest.mark.parametrize("path", ["exact", "ivf"])
def test_mines_and_copies_under_concurrent_writes_keep_their_invariants(path):
    """One writer upserts, overwrites, deletes and moves rows while two Mines and a copier run in a loop.

    Whatever the interleaving: a Mine never returns an id twice, an excluded id, or an id deleted for good before it
    began; every returned score is the score of a version of that row that was written whole (no row torn between
    its image and text halves); a copy holds each id once, each row a version written whole. Once the writer stops,
    a Mine equals the reference and the store's rows equal the writer's."""
    rng = np.random.default_rng(13)
    ivf = IvfConfig(min_rows=64, nprobe=4, rebuild_fraction=0.2) if path == "ivf" else IvfConfig(min_rows=0)
    config = SearchConfig(device="cpu", store_block_rows=8, block_rows=3, topk="heap", ivf=ivf)
    miner = HardPairMiner(DIM, config)
    live_ids, doomed_ids = list(range(100)), list(range(100, 120))  # doomed: deleted once, never written again
    versions: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    current: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def write(ids, step):
        image, text = random_pairs(rng, len(ids), DIM)
        for j, i in enumerate(ids):
            versions.setdefault(i, []).append((image[j], text[j]))  # known before any reader can see it
            current[i] = (image[j], text[j])
        miner.upsert(np.asarray(ids, dtype=IDS), image, text, step)

    write(live_ids + doomed_ids, 1)
    if path == "ivf":
        assert miner.wait_for_ivf(WAIT_S)
    gone_for_good: set[int] = set()
    writer_done = threading.Event()
    failures: list[str] = []

    def writer():
        writer_rng = np.random.default_rng(14)
        try:
            for step in range(2, 200):
                op = writer_rng.integers(4)
                picked = sorted(writer_rng.choice(100, size=int(writer_rng.integers(1, 12)), replace=False).tolist())
                if op == 0:
                    write(picked, step)  # overwrites in place
                elif op == 1:  # delete and write back: the ids move to whatever slots are free
                    miner.delete(np.asarray(picked, dtype=IDS))
                    for i in picked:
                        current.pop(i)
                    write(picked, step)
                elif op == 2 and doomed_ids:
                    doomed = doomed_ids.pop()
                    miner.delete(np.array([doomed], dtype=IDS))
                    current.pop(doomed)
                    gone_for_good.add(doomed)
                else:
                    write(picked[:3], step)
        except Exception as error:
            failures.append(f"writer: {error!r}")
        finally:
            writer_done.set()

    def score_of(version, q_image, q_text):
        return float(np.dot(version[0], q_image)) * float(np.dot(version[1], q_text))

    def miner_loop(seed):
        loop_rng = np.random.default_rng(seed)
        while not writer_done.is_set():
            q_image, q_text = random_pairs(loop_rng, 2, DIM)
            exclude = loop_rng.choice(120, size=10, replace=False)
            deleted_before = set(gone_for_good)
            query = MineQuery(12, image=q_image, text=q_text, exclude_ids=exclude, max_similarity=2.0)
            result = miner.mine(query)
            for a in range(2):
                got = result.neighbour_ids[a][result.neighbour_ids[a] >= 0].tolist()
                scores = result.scores[a][: len(got)]
                bad = [f"{i} twice" for i in set(got) if got.count(i) > 1] + [
                    f"{i} excluded" for i in set(got) & set(exclude.tolist())
                ]
                bad += [f"{i} deleted before the Mine" for i in set(got) & deleted_before]
                for i, score in zip(got, scores):
                    if not any(abs(score_of(v, q_image[a], q_text[a]) - score) < 1e-5 for v in versions[i]):
                        bad.append(f"{i} scored {score}, no version of it has that score")
                if bad:
                    failures.append(f"Mine: {bad}")
                    return

    def copier():
        while not writer_done.is_set():
            ids, _, image, text = miner.copy_rows()
            if len(set(ids.tolist())) != len(ids):
                failures.append("copy: an id twice")
                return
            for j, i in enumerate(ids.tolist()):
                if not any(np.array_equal(image[j], v[0]) and np.array_equal(text[j], v[1]) for v in versions[i]):
                    failures.append(f"copy: row {i} is no version that was written")
                    return

    threads = [threading.Thread(target=writer, daemon=True)]
    threads += [threading.Thread(target=miner_loop, args=(seed,), daemon=True) for seed in (15, 16)]
    threads += [threading.Thread(target=copier, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:5]

    assert miner.size == len(current) == 120 - len(gone_for_good)
    ids, _, image, _ = miner.copy_rows()
    assert sorted(ids.tolist()) == sorted(current)
    for j, i in enumerate(ids.tolist()):
        np.testing.assert_array_equal(image[j], current[i][0])
    anchors = np.array([0, 50, 99], dtype=IDS)
    result = miner.mine(MineQuery(10, anchor_ids=anchors, max_similarity=2.0))
    q_image = np.stack([current[int(a)][0] for a in anchors])
    q_text = np.stack([current[int(a)][1] for a in anchors])
    want_ids, want_scores = reference_mine(current, q_image, q_text, 10, 1, 2.0, anchors.astype(np.int64))
    if path == "exact":
        np.testing.assert_array_equal(result.neighbour_ids, want_ids)
        np.testing.assert_allclose(result.scores, want_scores, rtol=1e-5, atol=1e-5)
    else:  # approximate candidates: each returned neighbour carries its exact score
        for a in range(3):
            for i, score in zip(result.neighbour_ids[a], result.scores[a]):
                if i >= 0:
                    expected = score_of(current[int(i)], q_image[a], q_text[a])
                    assert abs(expected - score) < 1e-5


def test_a_waiting_writer_holds_new_readers_back_and_its_release_lets_them_all_in():
    lock = ReadWriteLock()
    order: list[str] = []
    first_reader_in, first_reader_done = threading.Event(), threading.Event()

    def first_reader():
        with lock.read():
            order.append("first reader")
            first_reader_in.set()
            assert first_reader_done.wait(WAIT_S)

    def late_reader(name):
        with lock.read():
            order.append(name)

    def writer():
        with lock.write():
            order.append("writer")

    threads = [threading.Thread(target=first_reader, daemon=True)]
    threads[0].start()
    assert first_reader_in.wait(WAIT_S)
    threads.append(threading.Thread(target=writer, daemon=True))
    threads[1].start()
    assert lock.wait_for_writers(1, WAIT_S)
    threads += [threading.Thread(target=late_reader, args=(f"late reader {i}",), daemon=True) for i in range(3)]
    for thread in threads[2:]:
        thread.start()
    assert lock.wait_for_readers(3, WAIT_S)  # held back behind the waiting writer, not let in beside the first
    assert order == ["first reader"]
    first_reader_done.set()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a wakeup was lost"
    assert order[:2] == ["first reader", "writer"] and sorted(order[2:]) == [f"late reader {i}" for i in range(3)]
