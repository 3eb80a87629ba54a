"""Sessions across instances on a real broker: an instance drained or killed under traffic.

Two ``triows serve`` instances; Bob on B, a sender POSTing to A every few
milliseconds. B goes (SIGTERM: a drain; SIGKILL), Bob resumes on A with his
session's token and cursor: no send is refused, every 2xx message reaches
him exactly once, in the order sent, with consecutive ``seq``.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.brokers import require_broker
from tests.e2e import TARGETS_BY_NAME, Target, ready_instances

STEP_TIMEOUT = 60
SEND_EVERY = 0.005
SENDS_AFTER = 200  # sends after B went, while Bob comes back


def events_url(
    base_url: str, user: str, session: str | None = None, last: str | None = None
) -> str:
    url = base_url.replace("http://", "ws://") + f"/events?user={user}"
    if session is not None:
        url += f"&session={session}"
    if last is not None:
        url += f"&last={last}"
    return url


class Received:
    """What Bob's connections got, in order, across his reconnect."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.hellos: list[dict[str, Any]] = []
        # What the sender was answered: (status, message id of a 202).
        self.outcomes: list[tuple[int, str | None]] = []
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (checked after each frame and each send)."""
        while not condition():
            self._changed = trio.Event()
            await self._changed.wait()

    @property
    def cursor(self) -> str | None:
        if not self.frames:
            return None
        last = self.frames[-1]
        return f"{last['seq']}-{last['id']}"

    async def read(self, socket: WebSocketConnection) -> None:
        """Read until the socket closes."""
        self.hellos.append(json.loads(await socket.get_message()))
        self.changed()
        try:
            while True:
                frame = json.loads(await socket.get_message())
                if frame["type"] == "message":
                    self.frames.append(frame)
                    self.changed()
        except ConnectionClosed:
            return


async def sender(
    http: httpx.AsyncClient, base_url: str, received: Received, done: trio.Event
) -> None:
    n = 0
    while not done.is_set():
        response = await http.post(f"{base_url}/send", json={"to": "Bob", "message": n})
        body = response.json()
        status = response.status_code
        received.outcomes.append((status, body.get("id") if status == 202 else None))
        received.changed()
        n += 1
        await trio.sleep(SEND_EVERY)


async def run_case(
    target: Target, stop_signal: int, env: dict[str, str] | None = None
) -> tuple[list[tuple[int, str | None]], Received]:
    await require_broker(target.broker)
    received = Received()
    outcomes = received.outcomes
    async with (
        ready_instances(target, 2, env=env) as (a, b),
        httpx.AsyncClient(timeout=30) as http,
    ):
        done = trio.Event()
        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as sending:
                async with open_websocket_url(events_url(b.base_url, "Bob")) as socket:
                    async with trio.open_nursery() as reading:
                        reading.start_soon(received.read, socket)
                        await received.until(lambda: bool(received.hellos))
                        sending.start_soon(sender, http, a.base_url, received, done)
                        await received.until(lambda: len(received.frames) >= 50)
                        b.process.send_signal(stop_signal)
                        if stop_signal == signal.SIGKILL:
                            await b.process.wait()
                            reading.cancel_scope.cancel()  # the socket is cut, not closed
                sent_before = len(outcomes)
                token = received.hellos[0]["session"]
                url = events_url(a.base_url, "Bob", token, received.cursor)
                async with open_websocket_url(url) as socket, trio.open_nursery() as reading:
                    reading.start_soon(received.read, socket)
                    await received.until(lambda: len(outcomes) >= sent_before + SENDS_AFTER)
                    done.set()
                    wanted = {message_id for status, message_id in outcomes if status == 202}
                    await received.until(
                        lambda: wanted <= {frame["id"] for frame in received.frames}
                    )
                    await trio.sleep(0.5)  # a duplicate would come now
                    reading.cancel_scope.cancel()
    return outcomes, received


@pytest.mark.parametrize(
    ("target", "stop_signal", "queue_type"),
    [
        ("amqp091-rabbitmq", signal.SIGTERM, "classic"),
        ("amqp091-rabbitmq", signal.SIGKILL, "classic"),
        ("amqp091-rabbitmq", signal.SIGKILL, "quorum"),
        ("amqp10-rabbitmq", signal.SIGTERM, "classic"),
        ("amqp10-rabbitmq", signal.SIGKILL, "classic"),
        ("stomp-rabbitmq", signal.SIGTERM, "classic"),
        ("stomp-rabbitmq", signal.SIGKILL, "classic"),
    ],
    ids=[
        "drain",
        "kill",
        "kill-quorum",
        "amqp10-drain",
        "amqp10-kill",
        "stomp-drain",
        "stomp-kill",
    ],
)
async def test_an_instance_gone_under_traffic_loses_and_refuses_nothing_for_a_resumed_session(
    target: str, stop_signal: int, queue_type: str
) -> None:
    outcomes, received = await run_case(
        TARGETS_BY_NAME[target], stop_signal, {"TRIOWS_QUEUE_TYPE": queue_type}
    )
    assert [status for status, _ in outcomes if status != 202] == []
    assert received.hellos[1]["resumed"] is True
    ids = [frame["id"] for frame in received.frames]
    assert len(ids) == len(set(ids)), "a message came twice"
    sent = [message_id for _, message_id in outcomes]
    assert ids == sent, "not every message, or not in the order sent"
    assert [frame["seq"] for frame in received.frames] == list(range(1, len(ids) + 1))
