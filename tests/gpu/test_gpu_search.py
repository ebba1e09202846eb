"""GPU answers equal CPU answers (tests marked gpu; skipped where no CUDA device is visible)."""

import numpy as np
import pytest
import torch

from helip.miner_service.core.api import MineQuery
from helip.miner_service.core.config import SearchConfig
from helip.miner_service.core.miner import HardPairMiner
from helip.miner_service.core.search import Scoring
from tests.reference import random_pairs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DIM = 64


def filled(config, image, text):
    miner = HardPairMiner(DIM, config)
    miner.upsert(np.arange(len(image), dtype=np.uint64), image, text, 1)
    return miner


@pytest.mark.parametrize("scoring", list(Scoring))
def test_gpu_fp32_equals_cpu(scoring):
    image, text = random_pairs(np.random.default_rng(0), 20_000, DIM)
    cpu = filled(SearchConfig(device="cpu"), image, text)
    gpu = filled(SearchConfig(device="cuda", storage_dtype="float32", block_rows=4096), image, text)
    anchors = np.arange(0, 20_000, 97, dtype=np.uint64)
    exclude = np.arange(100, 200, dtype=np.uint64)
    a = cpu.mine(MineQuery(16, anchor_ids=anchors, exclude_ids=exclude, scoring=scoring))
    b = gpu.mine(MineQuery(16, anchor_ids=anchors, exclude_ids=exclude, scoring=scoring))
    assert (a.neighbour_ids == b.neighbour_ids).mean() > 0.999
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_gpu_fp16_close_to_cpu():
    image, text = random_pairs(np.random.default_rng(1), 20_000, DIM)
    cpu = filled(SearchConfig(device="cpu"), image, text)
    gpu = filled(SearchConfig(device="cuda"), image, text)  # auto: fp16 rows
    anchors = np.arange(0, 20_000, 50, dtype=np.uint64)
    a, b = cpu.mine(MineQuery(16, anchor_ids=anchors)), gpu.mine(MineQuery(16, anchor_ids=anchors))
    recall = np.mean([len(set(x) & set(y)) / 16 for x, y in zip(a.neighbour_ids, b.neighbour_ids)])
    assert recall > 0.97
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-2)


@pytest.mark.parametrize("ratio", [0.9, 0.5])
def test_gpu_guard_equals_cpu(ratio):
    """The false-negative guard on the GPU: its candidate list, and the guarded re-search of short anchors."""
    image, text = random_pairs(np.random.default_rng(2), 20_000, DIM)
    cpu = filled(SearchConfig(device="cpu"), image, text)
    gpu = filled(SearchConfig(device="cuda", storage_dtype="float32", block_rows=4096), image, text)
    anchors = np.arange(0, 20_000, 97, dtype=np.uint64)
    a = cpu.mine(MineQuery(16, anchor_ids=anchors, positive_ratio=ratio))
    b = gpu.mine(MineQuery(16, anchor_ids=anchors, positive_ratio=ratio))
    assert (a.neighbour_ids == b.neighbour_ids).mean() > 0.999
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scoring", list(Scoring))
def test_gpu_fused_kernel_equals_the_torch_path(dtype, scoring):
    # core.fused compiled for the device: the same rows, the same filters, merged Mines with their own exclusions.
    pytest.importorskip("triton")
    image, text = random_pairs(np.random.default_rng(4), 30_000, DIM)
    config = SearchConfig(device="cuda", storage_dtype=dtype, block_rows=8192, store_block_rows=16384)
    plain = filled(config, image, text)
    kernel = filled(SearchConfig(**{**config.__dict__, "kernel": "triton"}), image, text)
    for miner in (plain, kernel):
        miner.delete(np.arange(500, 600, dtype=np.uint64))
    rng = np.random.default_rng(5)
    queries = [
        MineQuery(16, anchor_ids=rng.choice(30_000, 300, replace=False), exclude_ids=np.arange(1000, 1500),
                  scoring=scoring),
        MineQuery(5, anchor_ids=rng.choice(30_000, 40, replace=False), scoring=scoring, max_similarity=0.5),
        MineQuery(64, anchor_ids=rng.choice(30_000, 7, replace=False), scoring=scoring),
    ]  # fmt: skip
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    for want, got in zip([plain.mine(q) for q in queries], kernel.mine_many(queries)):
        assert (want.neighbour_ids == got.neighbour_ids).mean() > (0.999 if dtype == "float32" else 0.97)
        np.testing.assert_allclose(want.scores, got.scores, atol=tolerance)
