"""The exact Mine as one fused Triton kernel: both products, the score, the filters and a top-k, tile by tile.

The torch path (search.score_block) writes an [anchors, rows] float32 score matrix per chunk and reads it back for
the top-k: at N = 10M rows and 512 anchors that traffic alone is several times the two products' time on a GPU
(docs/BENCHMARKS.md, GPU check). Here each program takes BLOCK_A anchors and a run of rows, computes the image and
text similarities of a BLOCK_N-row tile in registers (tl.dot, float32 accumulation), scores and filters them there,
and keeps a running top-K of the run; only K candidates per anchor and run reach memory, and a torch.topk over
those finishes the chunk. Nothing [anchors, rows]-sized is ever written.

Candidates are ranked as int64 keys: the score's float32 bits made order-preserving as a signed int32 in the high
half, the row in the low half, so one integer top-k carries both (equal scores: the later row first).

Filters, all in the kernel: the near-duplicate cut (either similarity above it), the anchor's own row, and a
per-row bit mask `row_bits` that holds deleted rows and excluded rows: bit m of a row is set when Mine m of a
merged pass (core.batching) excludes it, all bits when every anchor must skip it (a hole, a shared exclusion);
anchor a skips a row when row_bits & anchor_bits[a] != 0. The false-negative guard's cross terms are not here:
a guarded search takes the torch path (core.guard keeps it rare).

Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) runs this on CPU tensors, so the unit
tests check its answers against the torch path on the CPU; timings need a GPU (bench/gpu_check.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from helip.miner_service.core.search import NEG_INF, SearchQuery

BLOCK_A = 32  # anchors per program (the interpreter's; a GPU picks among TUNED)
BLOCK_N = 64  # rows per tile
BLOCK_D = 32  # embedding columns per step of the products
MAX_K = 64  # a tile's top-K is taken among its BLOCK_N rows: every config has BLOCK_N >= MAX_K
ROW_ALIGN = 128  # a run of rows is a whole number of tiles for every BLOCK_N below
# On a GPU the kernel is autotuned (once per dim and K) among these tile shapes: (BLOCK_A, BLOCK_N, BLOCK_D, warps,
# stages). Not yet measured on a device; bench/gpu_check.py reports what the tuned kernel achieves.
TUNED = [
    (32, 64, 32, 4, 2),
    (64, 64, 32, 4, 3),
    (64, 128, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (32, 128, 64, 4, 3),
]
MAX_MINES = 62  # bits of row_bits that can name a Mine of a merged pass (63: the sign, set for "every anchor")
ALL_BITS = -1


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(query: SearchQuery, device: torch.device) -> bool:
    """Whether the kernel can answer this search (else the torch path does)."""
    if device.type != "cuda" and not interpreted():
        return False
    owners = 0 if query.anchor_owner is None else int(query.anchor_owner.max()) + 1 if len(query.anchor_owner) else 0
    return not query.positive_ratio and query.k <= MAX_K and owners <= MAX_MINES


@triton.jit
def _orderable(score):
    """float32 -> int32 with the same order (negative floats' bits compare backwards as ints: flip them)."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _mine_kernel(
    q_image,
    q_text,
    r_image,
    r_text,
    row_bits,
    anchor_bits,
    self_rows,
    out_keys,
    n_anchors,
    n_rows,
    dim,
    rows_per_program,
    runs,
    cut,
    SCORING: tl.constexpr,
    CUT: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    run = tl.program_id(1)
    anchors = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    anchor_ok = anchors < n_anchors
    bits_of_anchor = tl.load(anchor_bits + anchors, mask=anchor_ok, other=0)
    own_row = tl.load(self_rows + anchors, mask=anchor_ok, other=-1)
    lowest = (_orderable(tl.full((BLOCK_A, K), float("-inf"), tl.float32)).to(tl.int64) << 32) | 0
    best = lowest
    first_row = run * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for tile in range(first_row, last_row, BLOCK_N):
        rows = tile + tl.arange(0, BLOCK_N)
        row_ok = rows < last_row
        image_sim = tl.zeros((BLOCK_A, BLOCK_N), dtype=tl.float32)
        text_sim = tl.zeros((BLOCK_A, BLOCK_N), dtype=tl.float32)
        for first_col in range(0, dim, BLOCK_D):
            cols = first_col + tl.arange(0, BLOCK_D)
            col_ok = cols < dim
            q_mask = anchor_ok[:, None] & col_ok[None, :]
            r_mask = row_ok[:, None] & col_ok[None, :]
            if SCORING != 4:  # every scoring but TEXT reads the images
                qi = tl.load(q_image + anchors[:, None] * dim + cols[None, :], mask=q_mask, other=0.0)
                ri = tl.load(r_image + rows[:, None] * dim + cols[None, :], mask=r_mask, other=0.0)
                image_sim = tl.dot(qi, tl.trans(ri), image_sim, input_precision=PRECISION)
            if SCORING != 3 or CUT:  # every scoring but IMAGE reads the texts; so does the cut
                qt = tl.load(q_text + anchors[:, None] * dim + cols[None, :], mask=q_mask, other=0.0)
                rt = tl.load(r_text + rows[:, None] * dim + cols[None, :], mask=r_mask, other=0.0)
                text_sim = tl.dot(qt, tl.trans(rt), text_sim, input_precision=PRECISION)
            if SCORING == 4 and CUT:
                qi = tl.load(q_image + anchors[:, None] * dim + cols[None, :], mask=q_mask, other=0.0)
                ri = tl.load(r_image + rows[:, None] * dim + cols[None, :], mask=r_mask, other=0.0)
                image_sim = tl.dot(qi, tl.trans(ri), image_sim, input_precision=PRECISION)
        if SCORING == 1:
            score = image_sim * text_sim
        elif SCORING == 2:
            score = image_sim + text_sim
        elif SCORING == 3:
            score = image_sim
        else:
            score = text_sim
        keep = row_ok[None, :] & (rows[None, :] != own_row[:, None])
        if CUT:
            keep = keep & (image_sim <= cut) & (text_sim <= cut)
        skip = tl.load(row_bits + rows, mask=row_ok, other=0)
        keep = keep & ((skip[None, :] & bits_of_anchor[:, None]) == 0)
        score = tl.where(keep, score, float("-inf"))
        keys = (_orderable(score).to(tl.int64) << 32) | rows[None, :].to(tl.int64)
        tile_best = tl.topk(keys, K, dim=1)
        best = tl.topk(tl.reshape(tl.join(best, tile_best), (BLOCK_A, 2 * K)), K, dim=1)
    out = out_keys + anchors[:, None] * (runs * K) + run * K + tl.arange(0, K)[None, :]
    tl.store(out, best, mask=anchor_ok[:, None])


def _tuned_kernel():
    """_mine_kernel autotuned over TUNED on a GPU; the kernel with the fixed blocks under the interpreter."""
    if interpreted():
        return None
    configs = [
        triton.Config({"BLOCK_A": a, "BLOCK_N": n, "BLOCK_D": d}, num_warps=warps, num_stages=stages)
        for a, n, d, warps, stages in TUNED
    ]
    return triton.autotune(configs=configs, key=["dim", "K", "SCORING", "CUT"])(_mine_kernel)


_TUNED = _tuned_kernel()


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, rows int64; -1 where the score is -inf) of int64 keys."""
    high = (keys >> 32).to(torch.int32)
    scores = torch.where(high >= 0, high, high ^ 0x7FFFFFFF).view(torch.float32)
    rows = keys & 0xFFFFFFFF
    return scores, rows.masked_fill(scores == NEG_INF, -1)


def _runs(n_anchors: int, n_rows: int, device: torch.device) -> int:
    """Runs of rows per anchor group: enough programs to fill the device, each run at least a few tiles long."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    groups = triton.cdiv(n_anchors, BLOCK_A)
    return max(1, min(triton.cdiv(target, groups), triton.cdiv(n_rows, 4 * BLOCK_N)))


def row_bits(query: SearchQuery, first_slot: int, n_rows: int, live: torch.Tensor | None) -> torch.Tensor:
    """[n_rows] int64 skip bits of the rows in slots first_slot.. (see the module's docstring)."""
    bits = torch.zeros(n_rows, dtype=torch.int64, device=query.image.device)
    if live is not None:
        bits.masked_fill_(~live, ALL_BITS)
    if not query.exclude_slots.numel():
        return bits
    rows = query.exclude_slots - first_slot
    in_range = (rows >= 0) & (rows < n_rows)
    if query.exclude_owner is None:
        bits[rows[in_range]] = ALL_BITS
        return bits
    # One bit per (row, Mine) pair, each pair once, so that adding the bits is a bitwise or.
    pairs = torch.unique((rows[in_range] << 6) | query.exclude_owner[in_range])
    owned = torch.zeros_like(bits)
    owned.index_put_((pairs >> 6,), torch.ones_like(pairs) << (pairs & 63), accumulate=True)
    return torch.where(bits == ALL_BITS, bits, owned)


def anchor_bits(query: SearchQuery) -> torch.Tensor:
    if query.anchor_owner is None:
        return torch.full((len(query.image),), ALL_BITS, dtype=torch.int64, device=query.image.device)
    return torch.ones_like(query.anchor_owner) << query.anchor_owner


def chunk_top(
    query: SearchQuery,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    skip_bits: torch.Tensor,
    first_slot: int,
    bits_of_anchors: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [anchors, k'] float32, rows [anchors, k'] int64 within the chunk, -1 none), k' = min(k, rows): the
    top k of the anchors over a chunk of rows whose first slot is first_slot, with every filter applied."""
    n_anchors, n_rows = len(query.image), len(image_rows)
    k = query.k
    K = max(1, triton.next_power_of_2(k))
    runs = _runs(n_anchors, n_rows, image_rows.device)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, runs), ROW_ALIGN) * ROW_ALIGN
    runs = triton.cdiv(n_rows, rows_per_program)
    keys = torch.empty((n_anchors, runs, K), dtype=torch.int64, device=image_rows.device)
    own = query.self_slots - first_slot
    own = torch.where((query.self_slots >= 0) & (own >= 0) & (own < n_rows), own, -1)
    cut = float(query.max_similarity)
    blocks = {} if _TUNED is not None else {"BLOCK_A": BLOCK_A, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}
    kernel = _TUNED if _TUNED is not None else _mine_kernel
    kernel[lambda meta: (triton.cdiv(n_anchors, meta["BLOCK_A"]), runs)](
        query.image.contiguous(),
        query.text.contiguous(),
        image_rows.contiguous(),
        text_rows.contiguous(),
        skip_bits,
        bits_of_anchors,
        own,
        keys,
        n_anchors,
        n_rows,
        image_rows.shape[1],
        rows_per_program,
        runs,
        cut,
        SCORING=int(query.scoring),
        CUT=cut < 1.0,
        K=K,
        **blocks,
        PRECISION="ieee" if image_rows.dtype == torch.float32 else "tf32",
    )
    top = torch.topk(keys.view(n_anchors, runs * K), min(k, runs * K, n_rows), dim=1).values
    return _decode(top)


def offer_chunk_top(query: SearchQuery, block, first: int, last: int, topk) -> None:
    """search.exact_search's offer_chunk for the fused kernel: rows [first, last) of `block` reach `topk` as their
    top k per anchor (labelled by id), never as a score matrix. Called under the block's read lock."""
    live = block.live_mask[first:last] if block.holes else None
    skip = row_bits(query, block.first_slot + first, last - first, live)
    scores, rows = chunk_top(
        query, block.image[first:last], block.text[first:last], skip, block.first_slot + first, anchor_bits(query)
    )
    topk.add(scores, block.labels[first:last][rows.clamp(min=0)])
