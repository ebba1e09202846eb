"""helip's training side. The public API for any PyTorch loop (no DeepSpeed needed) is re-exported here:

    from trainer import HardPairSampler, hard_pair_loader, EmbeddingPusher, MiningConfig, CsvPairs, HelipLoss

Names load on first use, so `import trainer` (and `helip-train --help`) stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "HardPairSampler": "trainer.hard_pairs",
    "hard_pair_loader": "trainer.hard_pairs",
    "BatchLayout": "trainer.hard_pairs",
    "EmbeddingPusher": "trainer.pusher",
    "MiningConfig": "trainer.mining",
    "MiningCounters": "trainer.mining",
    "make_client": "trainer.mining",
    "CsvPairs": "trainer.data",
    "WebDatasetPairs": "trainer.data",
    "open_pairs": "trainer.data",
    "PairBatch": "trainer.data",
    "collate_pairs": "trainer.data",
    "BadSample": "trainer.data",
    "BadSampleLedger": "trainer.ledger",
    "TooManyBadSamples": "trainer.ledger",
    "HelipLoss": "trainer.losses",
    "LossConfig": "trainer.losses",
    "bootstrap_index": "trainer.bootstrap",
    "claim_namespace": "trainer.namespace",
    "dataset_fingerprint": "trainer.namespace",
    "NamespaceMismatch": "trainer.namespace",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
