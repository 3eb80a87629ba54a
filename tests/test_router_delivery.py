"""The router's inbound side: what the broker hands over is checked before a socket sees it,
one bad delivery never stops the pump, and an unsubscribe cut short is settled later."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
import trio
from anyio.abc import ObjectReceiveStream

import triows.router
from triows.backend import Delivery, Outcome
from triows.connection import Connection
from triows.metrics import Metrics
from triows.protocol import SendRequest, encode_message
from triows.router import Router
from triows.settings import Settings

LIMIT = 1024


class RecordingBackend:
    """A backend that records subscribe/unsubscribe and whose unsubscribe can be made to hang."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Delivery](100)
        self.keys: set[str] = set()
        self.unsubscribes: list[str] = []
        self.hang_unsubscribe = False

    # Without sessions: subscribed keys' messages come on ``incoming``.
    sessions = None

    @property
    def ready(self) -> bool:
        return True

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        return self.receive

    async def publish(self, key: str, body: bytes) -> Outcome:
        if key not in self.keys:
            return Outcome.UNROUTED
        await self.send.send((key, body))
        return Outcome.ROUTED

    async def subscribe(self, key: str) -> None:
        self.keys.add(key)

    async def unsubscribe(self, key: str) -> None:
        self.unsubscribes.append(key)
        if self.hang_unsubscribe:
            # Like a broker that does not answer: the key stays bound there.
            await trio.sleep_forever()
        self.keys.discard(key)


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("triows_messages_dropped_total", {"reason": reason})
    return value or 0.0


@asynccontextmanager
async def router_with_bob() -> AsyncIterator[tuple[Router, RecordingBackend, Connection, Metrics]]:
    backend = RecordingBackend()
    metrics = Metrics()
    router = Router(backend, metrics, Settings(max_message_bytes=LIMIT))
    bob = Connection("Bob", 16)
    async with router.attached(bob):
        yield router, backend, bob, metrics


def queued(connection: Connection) -> list[str]:
    """The frames offered to ``connection`` and not yet written (taken out)."""
    frames = list(connection._queue)
    connection._queue.clear()
    return frames


def genuine(to: str = "Bob", message: object = "hi") -> bytes:
    return encode_message("0123456789abcdef", "Anne", SendRequest(to, message))


FORGED = {
    "not-json": b"not json at all",
    "not-utf8": b"\xff\xfe{}",
    "hello": json.dumps({"type": "hello", "user": "Bob", "instance": "x", "protocol": 1}).encode(),
    "to-someone-else": genuine(to="Eve"),
    "no-id": json.dumps(
        {"type": "message", "from": "Anne", "to": "Bob", "message": 1, "ts": 1}
    ).encode(),
    "bad-from": json.loads(genuine()) | {"from": "Anne*"},
    "float-ts": json.loads(genuine()) | {"ts": 1.5},
    "nan": genuine().replace(b'"hi"', b"NaN"),
    "array": b"[1,2]",
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("body", FORGED.values(), ids=FORGED.keys())
async def test_a_forged_delivery_is_dropped_and_counted(body: bytes | dict[str, object]) -> None:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    async with router_with_bob() as (router, _, bob, metrics):
        good = genuine()
        router.deliver("user.Bob", raw)
        router.deliver("user.Bob", good)
        assert queued(bob) == [good.decode()]
        reason = "too_large" if len(raw) > LIMIT else "invalid"
        assert dropped(metrics, reason) == 1


async def test_a_delivery_over_the_size_limit_is_dropped_even_if_well_formed() -> None:
    async with router_with_bob() as (router, _, bob, metrics):
        router.deliver("user.Bob", genuine(message="x" * LIMIT))
        assert queued(bob) == []
        assert dropped(metrics, "too_large") == 1


async def test_drops_are_logged_once_per_interval_not_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with router_with_bob() as (router, *_):
        for _ in range(50):
            router.deliver("user.Bob", b"junk")
    lines = [r for r in caplog.records if r.getMessage() == "delivery_dropped"]
    assert len(lines) == 1


class BrokenConnection(Connection):
    """A connection with a bug: ``offer`` raises."""

    def offer(self, frame: str) -> bool:
        raise RuntimeError("a bug in a connection")


async def test_a_delivery_that_raises_is_counted_and_the_pump_goes_on() -> None:
    async with router_with_bob() as (router, backend, bob, metrics):
        broken = BrokenConnection("Bob", 16)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(router.run)
            async with router.attached(broken):
                await backend.publish("user.Bob", genuine(message=1))
                await trio.testing.wait_all_tasks_blocked()
            assert dropped(metrics, "error") == 1
            await backend.publish("user.Bob", genuine(message=2))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert [json.loads(f)["message"] for f in queued(bob)] == [1, 2]


async def test_an_unsubscribe_cut_short_is_retried_until_settled(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.run)
        backend.hang_unsubscribe = True
        async with router.attached(Connection("Bob", 4)):
            pass
        # The unsubscribe timed out: the broker may still route Bob here.
        assert router.unsettled == {"user.Bob"}
        assert "user.Bob" in backend.keys
        backend.hang_unsubscribe = False
        await trio.sleep(triows.router.RECONCILE_INTERVAL * 2)
        assert router.unsettled == set()
        assert "user.Bob" not in backend.keys
        assert (await backend.publish("user.Bob", b"{}")) is Outcome.UNROUTED
        nursery.cancel_scope.cancel()


async def test_a_new_connection_settles_a_cut_short_unsubscribe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    backend.hang_unsubscribe = True
    async with router.attached(Connection("Bob", 4)):
        pass
    assert router.unsettled == {"user.Bob"}
    backend.hang_unsubscribe = False
    async with router.attached(Connection("Bob", 4)):
        assert router.unsettled == set()
        assert "user.Bob" in backend.keys
    assert "user.Bob" not in backend.keys


async def test_release_all_unsubscribes_first_then_flushes_what_was_delivered() -> None:
    backend = RecordingBackend()
    metrics = Metrics()
    router = Router(backend, metrics, Settings())
    bob = Connection("Bob", 64)
    async with trio.open_nursery() as nursery, router.attached(bob):
        # Queued at the broker side for this instance, not yet pumped.
        for n in range(5):
            await backend.publish("user.Bob", genuine(message=n))
        nursery.start_soon(router.run)
        await router.release_all(timeout=5)
        # The broker routes nothing more here: Bob is offline ...
        assert "user.Bob" not in backend.keys
        assert await backend.publish("user.Bob", genuine(message=99)) is Outcome.UNROUTED
        # ... and everything already delivered is in Bob's queue, his socket still open.
        assert bob.close_code is None
        assert [json.loads(frame)["message"] for frame in queued(bob)] == [0, 1, 2, 3, 4]
        assert dropped(metrics, "no_connection") == 0
        nursery.cancel_scope.cancel()


async def test_a_connection_attached_after_release_all_is_closed_with_1012() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    await router.release_all(timeout=1)
    late = Connection("Carol", 4)
    async with router.attached(late):
        assert late.close_code == 1012
        assert "user.Carol" not in backend.keys


async def test_the_pump_survives_a_delivery_that_raises_outside_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with router_with_bob() as (router, backend, bob, metrics):
        deliver = router.deliver
        calls = 0

        def flaky(key: str, body: bytes) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise KeyError("a bug in the router")
            deliver(key, body)

        monkeypatch.setattr(router, "deliver", flaky)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(router.run)
            await backend.publish("user.Bob", genuine(message=1))
            await backend.publish("user.Bob", genuine(message=2))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert dropped(metrics, "error") == 1
        assert [json.loads(f)["message"] for f in queued(bob)] == [2]


async def test_len_counts_connections_without_copying() -> None:
    async with router_with_bob() as (router, *_):
        assert len(router) == len(router.connections) == 1
