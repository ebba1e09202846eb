"""Approximate candidates for very large stores: a FAISS IVF over a snapshot of the rows, on the CPU or on a GPU.

The IVF indexes the concatenated pair vector [x; t]/sqrt(2), whose inner product is the mean of the image and
text similarities (the SUM scoring halved), and is keyed by sample id, so rows that move slots (deletes) or change
(overwrites) stay findable; the miner re-ranks every candidate exactly with the current rows and the requested
scoring. Rows written after the snapshot are searched exactly by the miner until the next rebuild.

Its copy of the rows is coded per `search.ivf.codec` (a 100M-row store of d = 256 is 102 GB in fp16; a flat IVF copy
beside it would be 205 GB more, a PQ copy 6.4 GB). On a GPU miner the index lives on the miner's GPU when FAISS was
built with GPU support (the faiss-gpu wheel); `placement` decides.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

from helip.miner_service.core.config import IvfConfig

log = logging.getLogger(__name__)

PQ_MAX_BYTES = 64  # a PQ code's bytes at most: one byte per sub-vector, and FAISS's GPU IVF-PQ takes up to 96


def pq_subvectors(width: int) -> int:
    """Sub-vectors of a PQ code over vectors of `width`: the largest divisor of width up to min(64, width / 8), so
    that each sub-vector spans at least 8 dimensions (d = 256: [x; t] is 512 wide, 64 sub-vectors, 64 bytes)."""
    limit = max(1, min(PQ_MAX_BYTES, width // 8))
    return max(m for m in range(1, limit + 1) if width % m == 0)


def factory_string(width: int, nlist: int, codec: str) -> str:
    """The FAISS index_factory description of an IVF with `nlist` lists over vectors of `width`, coded per codec."""
    code = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8", "pq": f"PQ{pq_subvectors(width)}"}[codec]
    return f"IVF{nlist},{code}"


def placement(device_type: str, faiss_gpus: int) -> str | None:
    """Where a miner on `device_type` keeps its IVF: "cpu" on a CPU miner, "gpu" on a GPU miner whose FAISS sees a
    GPU, None (no IVF: every Mine exact) on a GPU miner with a CPU-only FAISS, whose candidate search would pull
    every query through the CPU while the rows wait on the GPU."""
    if device_type == "cpu":
        return "cpu"
    return "gpu" if faiss_gpus > 0 else None


def faiss_gpus() -> int:
    """GPUs this process's FAISS can use (0 for faiss-cpu, which lacks the call)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


class IvfCandidates:
    def __init__(self, index: faiss.Index, rows: int, code_bytes: int, resources=None):
        self.index = index
        self.rows = rows
        self.code_bytes = code_bytes  # bytes a row's code takes in the index
        self._resources = resources  # a GPU index's FAISS resources: kept alive as long as the index

    @classmethod
    def build(
        cls, image: np.ndarray, text: np.ndarray, ids: np.ndarray, config: IvfConfig, gpu: int | None = None
    ) -> IvfCandidates:
        """Train and fill an IVF over the rows, on the CPU, or on GPU `gpu` (trained and filled there)."""
        started = time.perf_counter()
        n, dim = image.shape
        vectors = pair_vectors(image, text)
        nlist = int(min(65536, max(64, 4 * math.sqrt(n))))
        index = faiss.index_factory(2 * dim, factory_string(2 * dim, nlist, config.codec), faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if config.codec == "pq":
            # The factory's IVF-PQ also trains a polysemous code (for Hamming pre-filtering, which is never used
            # here): 27 s of 27.1 for 1,000 rows of width 64 on 1 core.
            ivf.do_polysemous_training = False
        code_bytes = ivf.code_size
        resources = None
        if gpu is not None:
            resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(resources, gpu, index)
        rng = np.random.default_rng(0)
        train = vectors[rng.choice(n, size=min(n, max(config.max_train_points, 39 * nlist)), replace=False)]
        index.train(train)
        index.add_with_ids(vectors, ids.astype(np.int64))
        space = faiss.GpuParameterSpace() if gpu is not None else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", config.nprobe)
        log.info(
            "IVF built over %d rows (nlist=%d, %s, %d B a row, %s) in %.1f s",
            n,
            nlist,
            config.codec,
            code_bytes,
            "cpu" if gpu is None else f"cuda:{gpu}",
            time.perf_counter() - started,
        )
        return cls(index, n, code_bytes, resources)

    def candidates(self, image: np.ndarray, text: np.ndarray, n_candidates: int) -> np.ndarray:
        """Candidate ids [anchors, n_candidates] (int64, -1 where the IVF found fewer)."""
        _, ids = self.index.search(pair_vectors(image, text), n_candidates)
        return ids


def pair_vectors(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([image, text], axis=1), dtype=np.float32) / np.float32(math.sqrt(2))
