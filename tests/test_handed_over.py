"""triows.backends.handed_over: the window of bodies a backend remembers across reconnects."""

from __future__ import annotations

import pytest

from triows.backends.handed_over import HandedOver


@pytest.mark.parametrize("digests", [False, True])
def test_remembers_the_latest_bodies_and_forgets_older_ones(digests: bool) -> None:
    handed_over = HandedOver(2, digests=digests)
    for body in (b"1", b"2", b"3"):
        handed_over.add(body)
    assert b"1" not in handed_over
    assert b"2" in handed_over
    assert b"3" in handed_over
    assert b"4" not in handed_over


def test_an_empty_window_remembers_nothing() -> None:
    handed_over = HandedOver(0)
    handed_over.add(b"1")
    assert b"1" not in handed_over
