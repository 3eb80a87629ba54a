"""The bench's bookkeeping counts lost, duplicated and out-of-order messages correctly."""

from __future__ import annotations

from bench.tally import Tally, percentile


def _message(stream: int, number: int) -> dict[str, float]:
    return {"s": stream, "n": number, "t": 0.0}


def test_a_confirmed_message_that_never_arrives_is_lost() -> None:
    tally = Tally()
    tally.confirm(0, 0)
    tally.confirm(0, 1)
    tally.arrive(0, _message(0, 0))
    summary = tally.summary()
    assert (summary["delivered"], summary["lost"]) == (1, 1)
    assert not tally.all_arrived


def test_a_message_arriving_before_its_confirmation_is_delivered() -> None:
    tally = Tally()
    tally.arrive(0, _message(3, 7))
    tally.confirm(3, 7)
    assert tally.all_arrived
    assert tally.summary()["lost"] == 0


def test_a_second_arrival_is_a_duplicate() -> None:
    tally = Tally()
    tally.confirm(0, 0)
    tally.arrive(0, _message(0, 0))
    tally.arrive(0, _message(0, 0))
    assert tally.summary()["duplicated"] == 1


def test_order_is_checked_per_stream_and_receiver() -> None:
    tally = Tally()
    for number in (0, 1, 2):
        tally.confirm(0, number)
        tally.confirm(1, number)
    # Streams interleave freely; only a stream going backwards at one receiver counts.
    for stream, number in ((0, 0), (1, 0), (0, 2), (1, 1), (0, 1), (1, 2)):
        tally.arrive(0, _message(stream, number))
    assert tally.summary()["out_of_order"] == 1


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(value) for value in range(1, 101)]
    assert (percentile(ordered, 0.5), percentile(ordered, 0.99), percentile(ordered, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )


def test_a_room_message_is_complete_once_every_member_got_it_once() -> None:
    tally = Tally(fanout=3)
    tally.confirm(0, 0)
    tally.confirm(0, 1)
    for receiver in (0, 1, 2):
        tally.arrive(receiver, _message(0, 0))
    tally.arrive(0, _message(0, 1))
    tally.arrive(0, _message(0, 1))  # a second copy at the same member
    tally.arrive(1, _message(0, 1))
    assert not tally.all_arrived
    summary = tally.summary()
    # Deliveries: 3 of message 0, 2 of message 1 (one member never got it).
    assert (summary["delivered"], summary["lost"], summary["duplicated"]) == (5, 1, 1)
    # Fan-out latency: one per complete message.
    assert len(tally.latencies) == 1
    tally.arrive(2, _message(0, 1))
    assert tally.all_arrived and len(tally.latencies) == 2
