"""The per-user token bucket that paces event streams' rooms (pure, no clock)."""

from __future__ import annotations

import pytest

from triows.rate import PRUNE_AFTER, RatePerUser


def test_a_user_may_take_the_burst_at_once_then_waits_for_the_rate() -> None:
    rate = RatePerUser(rate=2.0, burst=4)
    assert rate.take("Anne", 4, now=0.0) == 0
    assert rate.take("Anne", 1, now=0.0) == pytest.approx(0.5)
    assert rate.take("Anne", 1, now=0.5) == 0


def test_a_refused_request_takes_nothing() -> None:
    rate = RatePerUser(rate=1.0, burst=4)
    assert rate.take("Anne", 3, now=0.0) == 0
    assert rate.take("Anne", 2, now=0.0) == pytest.approx(1.0)
    assert rate.take("Anne", 1, now=0.0) == 0


def test_users_do_not_share_a_bucket() -> None:
    rate = RatePerUser(rate=1.0, burst=2)
    assert rate.take("Anne", 2, now=0.0) == 0
    assert rate.take("Bob", 2, now=0.0) == 0


def test_more_than_the_burst_costs_a_full_bucket() -> None:
    rate = RatePerUser(rate=1.0, burst=2)
    assert rate.take("Anne", 5, now=0.0) == 0
    assert rate.take("Anne", 5, now=1.0) == pytest.approx(1.0)


def test_buckets_full_again_are_forgotten() -> None:
    rate = RatePerUser(rate=1.0, burst=1)
    for number in range(PRUNE_AFTER - 1):
        rate.take(f"u{number}", 1, now=0.0)
    rate.take("late", 1, now=5.0)  # the others are full again by now
    assert rate.take("late", 1, now=5.0) > 0  # still remembered
    assert len(rate) == 1
