"""URL passwords never reach a log line: redact_url and the handler filter the miner's CLI installs."""

from __future__ import annotations

import io
import logging

import pytest

from helip.miner_service.service.config import DurabilityConfig
from helip.miner_service.wire.security import RedactingFilter, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:p4ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://helip:p4ss/w0rd@redis.example:6380/1", "rediss://helip:***@redis.example:6380/1"),
        ("connect to redis://default:x@10.0.0.1:6379 failed", "connect to redis://default:***@10.0.0.1:6379 failed"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),  # nothing to hide
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url_masks_only_the_password(url, expected):
    assert redact_url(url) == expected


def test_the_filter_masks_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("helip-test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("log in %s", "redis://:s3cret@redis:6379/0")
        try:
            raise ConnectionError("cannot reach redis://user:s3cret@redis:6379/0")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "s3cret" not in text
    assert "log in redis://:***@redis:6379/0" in text and "redis://user:***@redis:6379/0" in text


def test_the_durability_config_repr_leaves_the_url_out():
    assert "s3cret" not in repr(DurabilityConfig(redis_url="redis://:s3cret@redis:6379/0", snapshot_dir="/snapshots"))
