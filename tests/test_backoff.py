"""The shared reconnect backoff: capped, jittered, exponential, resettable."""

from __future__ import annotations

import logging
import random

import pytest

from triows.backoff import Backoff


def test_delays_stay_within_a_doubling_ceiling_up_to_the_cap() -> None:
    backoff = Backoff(max_delay=2.0, initial=0.1, rng=random.Random(7))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    for ceiling in ceilings:
        assert 0 <= backoff.next_delay() <= ceiling


def test_delays_are_jittered() -> None:
    backoff = Backoff(max_delay=100.0, initial=100.0, rng=random.Random(7))
    assert len({backoff.next_delay() for _ in range(10)}) == 10


def test_reset_starts_again_from_the_smallest_delay() -> None:
    backoff = Backoff(max_delay=50.0, initial=0.1, rng=random.Random(7))
    for _ in range(20):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_a_very_long_outage_does_not_overflow() -> None:
    backoff = Backoff(max_delay=15.0, rng=random.Random(7))
    for _ in range(10_000):
        assert backoff.next_delay() <= 15.0


@pytest.mark.parametrize(("initial", "max_delay"), [(0, 1), (1, 0), (-1, 1)])
def test_non_positive_delays_are_refused(initial: float, max_delay: float) -> None:
    with pytest.raises(ValueError):
        Backoff(max_delay=max_delay, initial=initial)


async def test_waiting_after_a_loss_logs_one_broker_unavailable_event_and_sleeps_the_delay(
    autojump_clock: object,
) -> None:
    import trio

    backoff = Backoff(max_delay=8.0, initial=8.0, rng=random.Random(7))
    expected = Backoff(max_delay=8.0, initial=8.0, rng=random.Random(7)).next_delay()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("triows")
    logger.addHandler(handler)
    try:
        started = trio.current_time()
        await backoff.wait_after_loss("broker:5672", ConnectionRefusedError("refused"))
    finally:
        logger.removeHandler(handler)
    assert trio.current_time() - started == pytest.approx(expected)
    (record,) = records
    assert record.getMessage() == "broker_unavailable"
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["broker"], fields["error"]) == ("broker:5672", "refused")
