"""The miner as a real process: answers equal a brute-force reference, filters, concurrency, metrics."""

from __future__ import annotations

import signal
import threading
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helip.miner.v1 import miner_pb2 as pb
from helip.miner_service.client.single import ClientConfig, MinerClient
from tests.reference import random_pairs, reference_mine

DIM = 16


def client_for(miner) -> MinerClient:
    client = MinerClient(ClientConfig(address=miner.address, wire_dtype=pb.FLOAT32, timeout_s=30))
    client.wait_ready(30)
    return client


def upsert_rows(client, rng, ids, step=1):
    image, text = random_pairs(rng, len(ids), DIM)
    client.upsert(np.asarray(ids), image, text, step)
    return {int(i): (image[j], text[j]) for j, i in enumerate(ids)}


@pytest.fixture(scope="module")
def loaded(shared_miner):
    client = client_for(shared_miner)
    rng = np.random.default_rng(11)
    rows = upsert_rows(client, rng, range(300))
    yield client, rows
    client.close()


@pytest.mark.parametrize("scoring", [pb.PRODUCT, pb.SUM, pb.IMAGE, pb.TEXT, pb.SCORING_UNSPECIFIED])
def test_mine_by_id_equals_reference(loaded, scoring):
    client, rows = loaded
    anchors = np.array([0, 17, 123, 299], dtype=np.uint64)
    exclude = [5, 6, 200]
    got = client.mine(8, anchor_ids=anchors, exclude_ids=exclude, scoring=scoring)
    q_image = np.stack([rows[int(a)][0] for a in anchors])
    q_text = np.stack([rows[int(a)][1] for a in anchors])
    ref_ids, ref_scores = reference_mine(
        rows, q_image, q_text, 8, scoring or pb.PRODUCT, 0.98, anchors.astype(np.int64), exclude
    )
    np.testing.assert_array_equal(got.ids, ref_ids)
    np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert got.size == 300


@pytest.mark.parametrize("scoring", [pb.PRODUCT, pb.SUM, pb.IMAGE, pb.TEXT])
def test_mine_by_embedding_equals_reference(loaded, scoring):
    client, rows = loaded
    q_image, q_text = random_pairs(np.random.default_rng(12), 5, DIM)
    got = client.mine(10, image=q_image, text=q_text, scoring=scoring, max_similarity=0.9)
    ref_ids, ref_scores = reference_mine(rows, q_image, q_text, 10, scoring, 0.9)
    np.testing.assert_array_equal(got.ids, ref_ids)
    np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_near_duplicate_cut_and_switch_off(loaded):
    client, rows = loaded
    # A stored row given by embedding is its own near-duplicate (similarity 1).
    q_image, q_text = rows[42][0][None], rows[42][1][None]
    assert 42 not in client.mine(5, image=q_image, text=q_text).ids
    assert client.mine(5, image=q_image, text=q_text, max_similarity=1.0).ids[0, 0] == 42


def test_upsert_overwrite_delete_and_padding(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    client = client_for(miner)
    rng = np.random.default_rng(13)
    rows = upsert_rows(client, rng, range(6))
    rows.update(upsert_rows(client, rng, [2, 3], step=9))  # overwrite in place
    assert client.stats().size == 6
    reply = client.delete([1, 4, 77])
    assert (reply.deleted, reply.size) == (2, 4)
    del rows[1], rows[4]
    got = client.mine(6, anchor_ids=[2], max_similarity=2)
    ref_ids, ref_scores = reference_mine(rows, rows[2][0][None], rows[2][1][None], 6, pb.PRODUCT, 2, np.array([2]))
    np.testing.assert_array_equal(got.ids, ref_ids)
    assert got.ids[0, 3:].tolist() == [-1, -1, -1]
    stats = client.stats()
    assert (stats.size, stats.dim, stats.min_step, stats.max_step, stats.device) == (4, DIM, 1, 9, "cpu")
    steps = dict(zip(got.ids[0, :3].tolist(), got.steps[0, :3].tolist()))
    assert all(steps[i] == (9 if i == 3 else 1) for i in steps)


def test_eight_concurrent_clients_reach_the_sequential_state(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    final: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            rng = np.random.default_rng(100 + index)
            with client_for(miner) as client:
                own = list(range(index * 1000, index * 1000 + 60))
                mine_rows = {}
                for round_ in range(6):
                    chosen = own[round_ * 10 : round_ * 10 + 30]  # overlapping rounds: overwrites
                    mine_rows.update(upsert_rows(client, rng, chosen, step=round_))
                    got = client.mine(4, anchor_ids=chosen[:5])
                    assert got.ids.shape == (5, 4)
                client.delete(own[:5])
                for gone in own[:5]:
                    mine_rows.pop(gone, None)
                with lock:
                    final.update(mine_rows)
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with client_for(miner) as client:
        assert client.stats().size == len(final)
        anchors = np.array(sorted(final)[::7], dtype=np.uint64)
        got = client.mine(10, anchor_ids=anchors)
        q_image = np.stack([final[int(a)][0] for a in anchors])
        q_text = np.stack([final[int(a)][1] for a in anchors])
        ref_ids, ref_scores = reference_mine(final, q_image, q_text, 10, pb.PRODUCT, 0.98, anchors.astype(np.int64))
        np.testing.assert_array_equal(got.ids, ref_ids)
        np.testing.assert_allclose(got.scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_metrics_parse_and_count_mine_calls(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    client = client_for(miner)
    upsert_rows(client, np.random.default_rng(14), range(50))
    for _ in range(7):
        client.mine(3, anchor_ids=[1, 2])
    text = urllib.request.urlopen(miner.metrics_url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    default = (("namespace", "default"),)
    assert samples[("helip_miner_mine_seconds_count", default)] == 7
    assert samples[("helip_miner_mine_seconds_bucket", (("le", "0.0001"), *default))] <= 7
    assert samples[("helip_miner_mine_seconds_bucket", (("le", "10.0"), *default))] == 7
    assert samples[("helip_miner_rows", default)] == 50
    assert samples[("helip_miner_upserted_rows_total", default)] == 50
    assert samples[("helip_miner_requests_total", (("code", "OK"), ("method", "Mine")))] == 7
    assert samples[("helip_miner_upsert_seconds_count", default)] == 1
    assert samples[("helip_miner_namespaces", ())] == 1


def test_sigterm_shuts_down_cleanly(miner_factory):
    miner = miner_factory("--dim", str(DIM))
    client_for(miner).stats()
    assert miner.stop(signal.SIGTERM) == 0
    assert "miner stopped" in miner.log()
