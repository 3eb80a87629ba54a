"""AMQP 0-9-1 subscription changes in batches: the Trio-side batcher alone, and on RabbitMQ."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.test_amqp091_backend import (
    open_instances,
    operator_call,
    publish_until_routed,
)
from triows.backend import Outcome
from triows.backends.amqp091_aio import AioSessionLost, BindingBatcher, BindingChange


class RecordingSender:
    """Records each batch as ``+key``/``-key``; answers when ``release`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = trio.Event()
        self.failure: BaseException | None = None

    async def __call__(self, changes: list[BindingChange]) -> None:
        self.batches.append([("+" if change.bind else "-") + change.key for change in changes])
        await self.release.wait()
        if self.failure is not None:
            raise self.failure


async def test_changes_waiting_while_a_batch_is_out_go_together_in_the_next_in_order() -> None:
    batcher, sender = BindingBatcher(batch_size=100), RecordingSender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender, 10.0)
        first = batcher.enqueue(True, "user.Anne")
        await trio.testing.wait_all_tasks_blocked()
        waiting = [
            batcher.enqueue(False, "user.Bob"),
            batcher.enqueue(True, "room.lobby"),
            batcher.enqueue(True, "user.Bob"),
        ]
        sender.release.set()
        for change in (first, *waiting):
            await change.wait()
        nursery.cancel_scope.cancel()
    assert sender.batches == [["+user.Anne"], ["-user.Bob", "+room.lobby", "+user.Bob"]]


async def test_a_batch_is_at_most_batch_size_changes() -> None:
    batcher, sender = BindingBatcher(batch_size=2), RecordingSender()
    sender.release.set()
    changes = [batcher.enqueue(True, f"user.u{number}") for number in range(5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender, 10.0)
        for change in changes:
            await change.wait()
        nursery.cancel_scope.cancel()
    assert [len(batch) for batch in sender.batches] == [2, 2, 1]


async def test_a_failed_batch_fails_every_later_change_too() -> None:
    # The channel's state is unknown after a failure: the session is rebuilt,
    # and its restore binds the held keys again.
    batcher, sender = BindingBatcher(batch_size=100), RecordingSender()
    sender.failure = AioSessionLost("channel closed")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender, 10.0)
        failing = batcher.enqueue(True, "user.Anne")
        await trio.testing.wait_all_tasks_blocked()
        behind = batcher.enqueue(True, "user.Bob")
        sender.release.set()
        for change in (failing, behind):
            with pytest.raises(AioSessionLost):
                await change.wait()
        with pytest.raises(AioSessionLost):
            await batcher.enqueue(True, "user.Eve").wait()
    assert sender.batches == [["+user.Anne"]]


async def test_a_batch_without_an_answer_in_time_fails_with_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batcher, sender = BindingBatcher(batch_size=100), RecordingSender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender, 10.0)
        with pytest.raises(TimeoutError):
            await batcher.enqueue(True, "user.Anne").wait()


async def test_changes_waiting_when_the_session_ends_fail() -> None:
    batcher, sender = BindingBatcher(batch_size=100), RecordingSender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender, 10.0)
        change = batcher.enqueue(True, "user.Anne")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(AioSessionLost):
        await change.wait()


@pytest.mark.broker
async def test_many_keys_changed_at_once_on_rabbitmq_route_exactly_the_held_ones(
    exchange: str,
) -> None:
    keys = [f"user.k{number}" for number in range(300)]
    async with open_instances(exchange, 2) as (sender, holder):
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(holder.subscribe, key)
        async with trio.open_nursery() as nursery:
            for key in keys[::2]:
                nursery.start_soon(holder.unsubscribe, key)
        outcomes = {key: await sender.publish(key, b"{}") for key in keys}
    assert [key for key, outcome in outcomes.items() if outcome == Outcome.ROUTED] == keys[1::2]


@pytest.mark.broker
async def test_a_bind_the_broker_refuses_drops_the_session_and_the_reconnect_binds_again(
    exchange: str,
) -> None:
    async with open_instances(exchange, 1) as (backend,):
        await backend.subscribe("user.Bob")
        await operator_call("exchange_delete", exchange=exchange)
        # NOT_FOUND closes the channel: the batch fails, the session is
        # rebuilt (the exchange declared again) and both keys bound.
        await backend.subscribe("user.Eve")
        for key in ("user.Eve", "user.Bob"):
            await publish_until_routed(backend, key, key.encode())
