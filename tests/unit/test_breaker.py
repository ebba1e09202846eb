"""The circuit breaker in front of the miner, on a stepped clock."""

from __future__ import annotations

import pytest

from helip.trainer.pairs.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_then_probes_with_backoff():
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(failures=3, cooldown_s=1.0, max_cooldown_s=3.0), clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success resets the run of failures
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN and breaker.opened == 1
    assert not breaker.allow()
    clock.now = 1.0
    assert breaker.allow() and breaker.state == HALF_OPEN  # one probe...
    assert not breaker.allow()  # ...and only one
    breaker.failure()  # failed probe: open again for twice as long
    clock.now = 2.5
    assert not breaker.allow()
    clock.now = 3.0
    assert breaker.allow()
    breaker.failure()
    clock.now = 3.0 + 2.9  # capped at max_cooldown_s = 3
    assert not breaker.allow()
    clock.now = 6.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.opened == 3
    breaker.failure()
    breaker.failure()
    breaker.failure()
    clock.now = 7.0  # the cooldown started over at 1 s after the success
    assert breaker.allow()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"failures": 0}, "failures"),
        ({"cooldown_s": 0}, "cooldown_s"),
        ({"cooldown_s": 5, "max_cooldown_s": 1}, "cooldown_s"),
    ],
)
def test_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BreakerConfig(**kwargs)
