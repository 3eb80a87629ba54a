"""AMQP 0-9-1 publishes in batches: the Trio-side batcher alone, and batches on RabbitMQ."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.test_amqp091_backend import open_instances
from triows.backend import BrokerUnavailable, Outcome
from triows.backends.amqp091_aio import BatchResult, PublishBatcher


class RecordingSender:
    """A batch sender that records each batch and answers ROUTED for all, on a signal."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = trio.Event()

    async def __call__(
        self, keys: list[str], bodies: list[bytes], exchanges: list[str | None]
    ) -> list[BatchResult]:
        self.batches.append(list(keys))
        await self.release.wait()
        return [Outcome.ROUTED] * len(keys)


async def test_a_lone_publish_is_sent_at_once_as_a_batch_of_one() -> None:
    batcher, sender = PublishBatcher(), RecordingSender()
    sender.release.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender)
        assert await batcher.publish("user.Bob", b"1") == Outcome.ROUTED
        nursery.cancel_scope.cancel()
    assert sender.batches == [["user.Bob"]]


async def test_publishes_waiting_while_a_batch_is_out_go_together_in_the_next() -> None:
    batcher, sender = PublishBatcher(), RecordingSender()
    outcomes: list[Outcome] = []

    async def publish(key: str) -> None:
        outcomes.append(await batcher.publish(key, b"x"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, sender)
        nursery.start_soon(publish, "user.A")
        await trio.testing.wait_all_tasks_blocked()
        for name in ("B", "C", "D"):
            nursery.start_soon(publish, f"user.{name}")
        await trio.testing.wait_all_tasks_blocked()
        sender.release.set()
        while len(outcomes) < 4:
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert sender.batches[0] == ["user.A"]
    assert sorted(key for batch in sender.batches[1:] for key in batch) == [
        "user.B",
        "user.C",
        "user.D",
    ]
    assert outcomes == [Outcome.ROUTED] * 4


async def test_publishes_waiting_when_the_batcher_stops_are_unavailable() -> None:
    batcher, sender = PublishBatcher(), RecordingSender()  # never released
    errors: list[str] = []

    async def publish() -> None:
        with pytest.raises(BrokerUnavailable) as raised:
            await batcher.publish("user.Bob", b"x")
        errors.append(str(raised.value))

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await batcher.run(sender, lost="connection gone")

        nursery.start_soon(run)
        nursery.start_soon(publish)
        nursery.start_soon(publish)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert errors == ["connection gone", "connection gone"]


@pytest.mark.broker
async def test_one_batch_on_rabbitmq_answers_each_message_for_itself(exchange: str) -> None:
    async with open_instances(exchange, 2) as (sender, holder):
        await holder.subscribe("user.Bob")
        results: dict[str, Outcome] = {}

        async def publish(key: str, body: bytes) -> None:
            results[body.decode()] = await sender.publish(key, body)

        async with trio.open_nursery() as nursery:
            for number in range(50):
                key = "user.Bob" if number % 2 == 0 else "user.Nobody"
                nursery.start_soon(publish, key, str(number).encode())
        assert results == {
            str(n): Outcome.ROUTED if n % 2 == 0 else Outcome.UNROUTED for n in range(50)
        }
        with trio.fail_after(30):
            received = sorted([int((await holder.incoming.receive())[1]) for _ in range(25)])
        assert received == list(range(0, 50, 2))
