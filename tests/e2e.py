"""What the end-to-end tests share: broker targets, real instances, and waiting on them.

A *target* is one backend on one broker. The tests in
``tests/test_across_instances.py`` run on every target; backend-specific
modules use the same helpers for what only their backend does.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import trio

from deploy.brokers import BROKERS
from triows.client import EventsClient, post_send
from triows.process import Instance, serve_instance

# Hang guards only; no test asserts on how long something took.
STEP_TIMEOUT = 30
LONG_TIMEOUT = 300
POLL_INTERVAL = 0.05
# Instances retry a lost broker at least every second, so that a test waiting
# for the end of an outage does not wait out the default backoff cap.
RECONNECT_MAX = "1"


@dataclass(frozen=True)
class Target:
    """One backend on one broker, as the end-to-end tests run it.

    Everything but ``confirmed_as`` comes from the broker table
    (``deploy/brokers.py``), ports and URLs included.
    """

    # The broker table's name for the broker (what tests.brokers.require_broker takes).
    broker: str
    # What a confirmed /send answers: "routed" where the broker tells the
    # backend whether anyone was subscribed (an offline recipient is then 404),
    # "accepted" where it cannot (an offline recipient is then 202 accepted too).
    confirmed_as: Literal["routed", "accepted"]

    @property
    def name(self) -> str:
        """``<backend>-<broker family>``, e.g. ``amqp10-rabbitmq`` (as the bench names it)."""
        return f"{self.backend}-{BROKERS[self.broker].family}"

    @property
    def backend(self) -> str:
        return BROKERS[self.broker].backend

    @property
    def broker_url(self) -> str:
        return BROKERS[self.broker].url

    @property
    def outage(self) -> str | None:
        """What tests.brokers.broker_outage takes down to stop this broker, if it can."""
        return BROKERS[self.broker].outage_name

    @property
    def offline_is_404(self) -> bool:
        """Whether ``/send`` to a user connected nowhere answers 404 on this target."""
        return self.confirmed_as == "routed"


TARGETS = (
    Target("rabbitmq", confirmed_as="routed"),
    # GarageMQ returns unroutable mandatory messages, so offline is 404 there
    # too. It answers each publisher confirm about 20 ms late, so one socket
    # sending one message after another (each acked before the next) is slow.
    Target("garagemq", confirmed_as="routed"),
    # RabbitMQ 3.x's AMQP 1.0 plugin settles a message "accepted" whether or
    # not a queue took it.
    Target("rabbitmq-amqp10", confirmed_as="accepted"),
    # STOMP has no way to tell whether anyone is subscribed.
    Target("rabbitmq-stomp", confirmed_as="accepted"),
    Target("activemq", confirmed_as="accepted"),
)
TARGETS_BY_NAME = {target.name: target for target in TARGETS}


def unique_exchange() -> str:
    """An exchange name of the test's own, so tests running at once never route into each other."""
    return f"triows-e2e-{secrets.token_hex(4)}"


@asynccontextmanager
async def serve_target(
    target: Target,
    exchange: str,
    *,
    broker_url: str | None = None,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
) -> AsyncIterator[Instance]:
    """A ``triows serve`` of ``target`` on ``exchange``, yielded once ``/healthz`` answers.

    Not necessarily ready: wait for that with ``Instance.wait_ready``. Open
    HTTP clients inside the block, so that they close first: a stopping
    instance waits for idle keep-alive connections (up to ``TRIOWS_CLOSE_TIMEOUT``).
    """
    async with serve_instance(
        target.backend,
        broker_url=broker_url or target.broker_url,
        env={"TRIOWS_EXCHANGE": exchange, "TRIOWS_RECONNECT_MAX": RECONNECT_MAX, **(env or {})},
        workers=workers,
    ) as instance:
        yield instance


@asynccontextmanager
async def ready_instances(
    target: Target,
    count: int = 2,
    *,
    exchange: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[list[Instance]]:
    """``count`` ready instances of ``target`` sharing one exchange (a new one by default).

    They start one after the other, each ready before the next: GarageMQ
    (Debian's build) hangs for good, every later connection included, when
    two connections declare the same exchange and then their queues at the
    same moment (see docs/backends.md). As with :func:`serve_target`,
    open HTTP clients inside the block.
    """
    exchange = exchange or unique_exchange()
    async with AsyncExitStack() as stack:
        instances: list[Instance] = []
        for _ in range(count):
            instance = await stack.enter_async_context(serve_target(target, exchange, env=env))
            await instance.wait_ready()
            instances.append(instance)
        yield instances


async def send_confirmed(
    http: httpx.AsyncClient, target: Target, base_url: str, to: str, message: Any
) -> str:
    """Anne's ``POST /send``; assert the 202 ``target`` gives a confirmed message; return its id."""
    response = await post_send(http, base_url, to, message, sender="Anne")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == target.confirmed_as
    message_id: str = response.json()["id"]
    return message_id


async def assert_offline_answer(
    http: httpx.AsyncClient, target: Target, base_url: str, to: str
) -> None:
    """Assert what ``/send`` answers on ``target`` for a user connected nowhere."""
    if target.offline_is_404:
        response = await post_send(http, base_url, to, "hello?", sender="Anne")
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"
    else:
        await send_confirmed(http, target, base_url, to, "hello?")


async def wait_until_offline(http: httpx.AsyncClient, base_url: str, user: str) -> None:
    """Poll ``/send`` until the broker reports ``user`` offline (404; ``routed`` targets only)."""
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            response = await post_send(http, base_url, user, "ping?", sender="probe")
            if response.status_code == 404:
                return
            await trio.sleep(POLL_INTERVAL)


async def send_to_self_until_routed(client: EventsClient) -> None:
    """Send to oneself over the socket until acked ``routed``, and read that message back.

    For a ``routed`` target whose instance may not be connected to the broker
    yet: until it is, the send is answered ``unavailable`` and is retried.
    """
    me = client.hello["user"]
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            await client.send(me, "self", ref="self")
            # The message may overtake its own ack: the broker delivers while the
            # sending side is still writing the ack.
            answer = await client.receive()
            if answer["type"] == "message":
                assert answer["message"] == "self"
                answer = await client.receive()
                assert (answer["type"], answer["status"]) == ("ack", "routed")
                return
            if answer["type"] == "ack":
                assert answer["status"] == "routed"
                assert (await client.receive())["message"] == "self"
                return
            assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
            await trio.sleep(POLL_INTERVAL)


async def assert_next_message(client: EventsClient, message_id: str, message: Any) -> None:
    """The next frame ``client`` gets is the message ``message_id`` carrying ``message``."""
    with trio.fail_after(STEP_TIMEOUT):
        frame = await client.receive()
    assert (frame["type"], frame["id"], frame["message"]) == ("message", message_id, message)


async def collect_frames(
    client: EventsClient, count: int, frame_type: str, into: list[dict[str, Any]]
) -> None:
    """Append the next ``count`` frames ``client`` gets to ``into``; each must be ``frame_type``.

    Appends as they come, so a caller running this in a nursery sees how far
    it got when a hang guard fires.
    """
    for _ in range(count):
        frame = await client.receive()
        assert frame["type"] == frame_type, frame
        into.append(frame)


class OutputLines:
    """The lines a child process writes to a pipe, kept as they come.

    Run :meth:`collect` in a nursery on the pipe (``process.stderr``): it reads
    until the child closes it, so the child never blocks on a full pipe.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._grew = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        async for chunk in stream:
            *complete, pending = (pending + chunk).split(b"\n")
            self._add(complete)
        self._add([pending] if pending else [])

    def _add(self, lines: list[bytes]) -> None:
        self.lines.extend(line.decode(errors="replace") for line in lines)
        self._grew.set()
        self._grew = trio.Event()

    async def wait_for(self, text: str) -> str:
        """The first line containing ``text``, once the child has written it."""
        while True:
            for line in self.lines:
                if text in line:
                    return line
            await self._grew.wait()

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines among them (what triows logs), decoded."""
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def events(self, event: str) -> list[dict[str, Any]]:
        """The log records of ``event``."""
        return [record for record in self.log_records() if record.get("event") == event]
