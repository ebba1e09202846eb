"""helip-train's settings with their defaults and meanings, read from TrainConfig's classes.

TrainConfig's sections live in import-light modules (helip.trainer.app.config, pairs.mining_config,
pairs.loss_config, tools.model_config: no torch, gRPC or open_clip); `helip.miner_service.core.settings_docs` reads
them (how a meaning is found is written there). tests/unit/test_cli_help.py fails when a field has no meaning.
"""

from __future__ import annotations

from functools import lru_cache

from helip.miner_service.core.settings_docs import Section, Setting, read_section

__all__ = ["Section", "Setting", "read_section", "sections", "settings"]


@lru_cache(maxsize=1)
def sections() -> tuple[Section, ...]:
    """TrainConfig's sections in declaration order (data, model, loss, mining, optim, run)."""
    from helip.trainer.app.config import TrainConfig

    return tuple(read_section(TrainConfig, ""))


def settings() -> dict[str, Setting]:
    return {s.key: s for section in sections() for s in section.settings}
