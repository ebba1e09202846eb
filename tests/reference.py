"""A brute-force numpy reference of the miner's answers, written independently of helip.miner_service.core.search."""

from __future__ import annotations

import numpy as np

SCORINGS = {
    1: lambda si, st: si * st,  # PRODUCT
    2: lambda si, st: si + st,  # SUM
    3: lambda si, st: si,  # IMAGE
    4: lambda si, st: st,  # TEXT
}


def reference_mine(
    rows: dict[int, tuple[np.ndarray, np.ndarray]],
    q_image: np.ndarray,
    q_text: np.ndarray,
    k: int,
    scoring: int = 1,
    cut: float = 0.98,
    self_ids=None,
    exclude=(),
    positive_ratio: float = 0.0,
):
    """rows: id -> (image, text). Returns (ids [a,k] int64 with -1 padding, scores [a,k] float64).

    positive_ratio: the false-negative guard (0: off), drop j when <image_a, text_j> or <text_a, image_j> reaches
    positive_ratio x <image_a, text_a>."""
    ids = np.array(sorted(rows), dtype=np.int64)
    image = np.stack([rows[i][0] for i in ids]).astype(np.float64) if len(ids) else np.zeros((0, q_image.shape[1]))
    text = np.stack([rows[i][1] for i in ids]).astype(np.float64) if len(ids) else np.zeros((0, q_text.shape[1]))
    out_ids = np.full((len(q_image), k), -1, dtype=np.int64)
    out_scores = np.full((len(q_image), k), -np.inf)
    for a in range(len(q_image)):
        si = image @ q_image[a].astype(np.float64)
        st = text @ q_text[a].astype(np.float64)
        score = SCORINGS[scoring](si, st)
        keep = np.ones(len(ids), dtype=bool)
        if cut < 1:
            keep &= (si <= cut) & (st <= cut)
        keep &= ~np.isin(ids, np.asarray(list(exclude), dtype=np.int64))
        if self_ids is not None:
            keep &= ids != self_ids[a]
        if positive_ratio:
            bound = positive_ratio * float(q_image[a].astype(np.float64) @ q_text[a].astype(np.float64))
            keep &= (text @ q_image[a].astype(np.float64) < bound) & (image @ q_text[a].astype(np.float64) < bound)
        order = [j for j in np.argsort(-score, kind="stable") if keep[j]][:k]
        out_ids[a, : len(order)] = ids[order]
        out_scores[a, : len(order)] = score[order]
    return out_ids, out_scores


def random_pairs(rng: np.random.Generator, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    image = rng.standard_normal((n, dim)).astype(np.float32)
    text = (image + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)  # correlated, as real pairs are
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text


def clustered_pairs(
    rng: np.random.Generator, n: int, dim: int, clusters: int, spread: float, text_noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """n unit (image, text) pairs around `clusters` random centres (image = centre + spread noise, text = image +
    text_noise noise): real embeddings cluster, which is what an IVF exploits and what makes neighbours tie."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    image = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    text = image + text_noise * rng.standard_normal((n, dim)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text
