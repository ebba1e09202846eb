"""Blocks on the GPU: answers equal the CPU's across blocks and writes, growth by one block; the IVF on the GPU with
faiss-gpu, and none (said so) without it."""

import logging

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import IVF_CODECS, IvfConfig, SearchConfig
from helip.miner_service.core.ivf import faiss_gpus
from helip.miner_service.core.miner import HardPairMiner
from tests.reference import clustered_pairs, random_pairs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DIM = 32


def written(config):
    """A miner after writes that touch several blocks: growth, overwrites, deletes and holes refilled."""
    rng = np.random.default_rng(0)
    miner = HardPairMiner(DIM, config)
    image, text = random_pairs(rng, 5000, DIM)
    miner.upsert(np.arange(5000, dtype=np.uint64), image, text, 1)
    image, text = random_pairs(rng, 300, DIM)
    miner.upsert(np.arange(0, 3000, 10, dtype=np.uint64), image, text, 2)
    miner.delete(np.arange(1, 5000, 7, dtype=np.uint64))
    image, text = random_pairs(rng, 800, DIM)
    miner.upsert(np.arange(10_000, 10_800, dtype=np.uint64), image, text, 3)
    return miner


def test_blocks_on_the_gpu_answer_like_the_cpu():
    cpu = written(SearchConfig(device="cpu", store_block_rows=1000))
    gpu = written(SearchConfig(device="cuda", storage_dtype="float32", store_block_rows=1000, block_rows=700))
    assert gpu.store.blocks()[0].image.device.type == "cuda"
    query = MineQuery(10, anchor_ids=np.arange(0, 10_800, 37), exclude_ids=np.arange(100, 150))
    a, b = cpu.mine(query), gpu.mine(query)
    assert (a.neighbour_ids == b.neighbour_ids).mean() > 0.999
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert gpu.stats().size == cpu.stats().size


def test_growth_allocates_one_block_at_a_time():
    block_rows = 4096
    miner = HardPairMiner(DIM, SearchConfig(device="cuda", storage_dtype="float32", store_block_rows=block_rows))
    image, text = random_pairs(np.random.default_rng(1), block_rows, DIM)
    # Rows, id labels and live flags of one block.
    block_bytes = block_rows * (2 * DIM * 4 + 8 + 1)
    torch.cuda.synchronize()
    for index in range(4):
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ids = np.arange(index * block_rows, (index + 1) * block_rows, dtype=np.uint64)
        miner.upsert(ids, image, text, 1)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        assert block_bytes <= grown < 1.1 * block_bytes
        assert torch.cuda.max_memory_allocated() - before < 2.5 * block_bytes  # the new rows in flight, no copy


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_blocks_spread_over_two_gpus_answer_like_one():
    one = written(SearchConfig(device="cuda:0", storage_dtype="float32", store_block_rows=1000))
    two = written(SearchConfig(device="cuda:0,cuda:1", storage_dtype="float32", store_block_rows=1000))
    assert {block.device.index for block in two.store.blocks()} == {0, 1}
    query = MineQuery(10, anchor_ids=np.arange(0, 10_800, 41))
    np.testing.assert_array_equal(one.mine(query).neighbour_ids, two.mine(query).neighbour_ids)


@pytest.mark.skipif(faiss_gpus() > 0, reason="this FAISS has GPU support: the IVF runs on the GPU (next test)")
def test_the_ivf_setting_is_off_on_a_gpu_miner_without_faiss_gpu_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="helip.miner_service.core.ivf_path"):
        miner = HardPairMiner(DIM, SearchConfig(device="cuda", ivf=IvfConfig(min_rows=1000)))
    assert "IVF candidate path off" in caplog.text
    image, text = random_pairs(np.random.default_rng(2), 2000, DIM)
    miner.upsert(np.arange(2000, dtype=np.uint64), image, text, 1)
    assert not miner.wait_for_ivf(5)
    assert not miner.mine(MineQuery(5, anchor_ids=[1, 2])).used_ivf
    stats = miner.stats()
    assert not stats.ivf_enabled and not stats.ivf_ready


@pytest.mark.skipif(faiss_gpus() == 0, reason="needs FAISS with GPU support (faiss-gpu in place of faiss-cpu)")
@pytest.mark.parametrize("codec", IVF_CODECS)
def test_the_ivf_runs_on_the_gpu_with_faiss_gpu_and_answers_like_the_cpus(codec):
    config = IvfConfig(min_rows=3000, nprobe=16, codec=codec)
    cpu = HardPairMiner(DIM, SearchConfig(device="cpu", ivf=config))
    gpu = HardPairMiner(DIM, SearchConfig(device="cuda", storage_dtype="float32", ivf=config))
    rng = np.random.default_rng(4)
    image, text = clustered_pairs(rng, 4000, DIM, clusters=40, spread=0.3, text_noise=0.2)
    for miner in (cpu, gpu):
        miner.upsert(np.arange(4000, dtype=np.uint64), image, text, 1)
        assert miner.wait_for_ivf(120)
    assert gpu.ivf.placement == "gpu"
    query = MineQuery(10, anchor_ids=np.arange(0, 4000, 13))
    a, b = cpu.mine(query), gpu.mine(query)
    assert a.used_ivf and b.used_ivf
    # Two IVFs trained apart may find different candidates; what both return is scored exactly, so compare recall.
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.neighbour_ids, b.neighbour_ids)])
    assert overlap > 0.9, overlap
