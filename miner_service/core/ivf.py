"""Approximate candidates for very large stores: a FAISS IVF over a snapshot of the rows.

The IVF indexes the concatenated pair vector [x; t]/sqrt(2), whose inner product is the mean of the image and
text similarities (the SUM scoring halved), and is keyed by sample id, so rows that move slots (deletes) or change
(overwrites) stay findable; the miner re-ranks every candidate exactly with the current rows and the requested
scoring. Rows written after the snapshot are searched exactly by the miner until the next rebuild.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

from helip.miner_service.core.config import IvfConfig

log = logging.getLogger(__name__)


class IvfCandidates:
    def __init__(self, index: faiss.IndexIVFFlat, rows: int, nprobe: int):
        self.index = index
        self.rows = rows
        self.nprobe = nprobe

    @classmethod
    def build(cls, image: np.ndarray, text: np.ndarray, ids: np.ndarray, config: IvfConfig) -> IvfCandidates:
        started = time.perf_counter()
        n, dim = image.shape
        vectors = pair_vectors(image, text)
        nlist = int(min(65536, max(64, 4 * math.sqrt(n))))
        quantizer = faiss.IndexFlatIP(2 * dim)
        index = faiss.IndexIVFFlat(quantizer, 2 * dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = vectors[rng.choice(n, size=min(n, max(config.max_train_points, 39 * nlist)), replace=False)]
        index.train(train)
        index.add_with_ids(vectors, ids.astype(np.int64))
        log.info("IVF built over %d rows (nlist=%d) in %.1f s", n, nlist, time.perf_counter() - started)
        return cls(index, n, config.nprobe)

    def candidates(self, image: np.ndarray, text: np.ndarray, n_candidates: int) -> np.ndarray:
        """Candidate ids [anchors, n_candidates] (int64, -1 where the IVF found fewer)."""
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, ids = self.index.search(pair_vectors(image, text), n_candidates, params=params)
        return ids


def pair_vectors(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([image, text], axis=1), dtype=np.float32) / np.float32(math.sqrt(2))
