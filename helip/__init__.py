"""helip: online hard-pair mining for CLIP training. The public API for any PyTorch loop is imported from here:

    from helip import CsvPairs, HelipLoss, LossConfig, MiningConfig, MiningSession

    session = MiningSession(MiningConfig(address="miner:50051", namespace="my-run")).start(dim=512, dataset=dataset)
    loader = session.loader(dataset, batch_size=256, num_workers=8, steps=total_steps)  # PairBatch + its layout
    pusher = session.pusher()                     # pusher.push(batch.ids, image_emb, text_emb, step) after a step

With the `hf` extra, `helip.HardPairTrainer` is a transformers.Trainer on hard-pair batches (helip.trainer.pairs.hf).

Names load on first use, so `import helip` (and every `--help`) stays fast, and transformers loads only for the
Trainer's names. The layers beneath:
helip.miner_service (core / wire / service / client) and helip.trainer (pairs: this library; tools; app: helip-train).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# Run from a source checkout without installing it (bench/gpu_env.sh on a lent GPU machine), helip/ holds only
# this file and the generated stubs, and the sub-packages are its siblings (miner_service/, trainer/); they are
# found there. An installed helip, wheel or editable, has them under helip/ (or mapped to it) already.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "miner_service").is_dir() and (_CHECKOUT / "miner_service" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

_EXPORTS = {
    # the hard-pair library (helip.trainer.pairs)
    "MiningSession": "helip.trainer.pairs.session",
    "MinerRefused": "helip.trainer.pairs.refusals",
    "SampleIndex": "helip.trainer.pairs.hard_pairs",
    "MinePrefetcher": "helip.trainer.pairs.mining",
    "HardPairSampler": "helip.trainer.pairs.hard_pairs",
    "hard_pair_loader": "helip.trainer.pairs.hard_pairs",
    "BatchLayout": "helip.trainer.pairs.hard_pairs",
    "EmbeddingPusher": "helip.trainer.pairs.pusher",
    "MiningConfig": "helip.trainer.pairs.mining_config",
    "MiningCounters": "helip.trainer.pairs.mining",
    "make_client": "helip.trainer.pairs.mining",
    "CsvPairs": "helip.trainer.pairs.data",
    "WebDatasetPairs": "helip.trainer.pairs.data",
    "open_pairs": "helip.trainer.pairs.data",
    "PairBatch": "helip.trainer.pairs.data",
    "collate_pairs": "helip.trainer.pairs.data",
    "BadSample": "helip.trainer.pairs.data",
    "BadSampleLedger": "helip.trainer.pairs.ledger",
    "TooManyBadSamples": "helip.trainer.pairs.ledger",
    "HelipLoss": "helip.trainer.pairs.losses",
    "LossConfig": "helip.trainer.pairs.loss_config",
    "bootstrap_index": "helip.trainer.pairs.bootstrap",
    # the Hugging Face Trainer integration (the `hf` extra: transformers, accelerate)
    "HardPairTrainer": "helip.trainer.pairs.hf",
    "HardPairCollator": "helip.trainer.pairs.hf",
    "HardPairRows": "helip.trainer.pairs.hf",
    "raw_pairs": "helip.trainer.pairs.hf",
    "claim_namespace": "helip.trainer.pairs.namespace",
    "dataset_fingerprint": "helip.trainer.pairs.namespace",
    "run_namespace": "helip.trainer.pairs.namespace",
    "NamespaceMismatch": "helip.trainer.pairs.namespace",
    # the miner's client, for code that speaks to a miner directly
    "MinerClient": "helip.miner_service.client.single",
    "ClientConfig": "helip.miner_service.client.single",
    "Neighbours": "helip.miner_service.client.single",
    "ReplicatedMinerClient": "helip.miner_service.client.replicas",
    "ShardedMinerClient": "helip.miner_service.client.sharded",
    "MinerApi": "helip.miner_service.client.protocol",
    "MineQuery": "helip.miner_service.client.protocol",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'helip' has no attribute {name!r}")


def __dir__():
    return __all__
