"""The load generator's senders and receivers, built on ``triows.client``.

Receivers are WebSockets of distinct users on instance B. Senders are
*streams*: each is sequential (an HTTP worker waiting for its 202, or a
WebSocket waiting for its ``ack``), so ``concurrency`` streams keep that many
sends in flight, and each stream's messages to one receiver must arrive in
order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed

from bench.tally import Tally
from triows.client import SendConnection, open_events, open_send_connection

# The outcomes of a batch item that mean "published" (the broker took it).
BATCH_ITEM_OK = ("routed", "accepted")
RECEIVE_SIZE = 65536


# open_events(base_url, user=...) or the peer's open_socketio(base_url, user=...).
OpenReceiver = Callable[..., AbstractAsyncContextManager[Any]]


class WebSocketSender(Protocol):
    """A sender's socket: triows' ``EventsClient`` or the peer's ``SocketIOClient``."""

    async def send(self, to: str, message: Any, ref: str) -> None: ...

    async def receive(self) -> dict[str, Any]: ...


class Recorder:
    """Where receivers record arrivals; the tally is swapped between warm-up and measurement."""

    def __init__(self) -> None:
        self.tally = Tally()
        # Presence events the receivers got (room-churn), counted throughout.
        self.presence_events = 0


class Schedule:
    """When streams may send: as fast as they can, or at a fixed total ``rate`` (msg/s)."""

    def __init__(self, duration: float, rate: float | None = None) -> None:
        self._start = trio.current_time()
        self._end = self._start + duration
        self._rate = rate
        self._slot = 0

    async def next_send(self) -> bool:
        """Wait for this stream's next turn; False once the duration is over."""
        if self._rate is None:
            return trio.current_time() < self._end
        at = self._start + self._slot / self._rate
        self._slot += 1
        if at >= self._end:
            return False
        await trio.sleep_until(at)
        return True


def _message(tally: Tally, stream: int, number: int) -> dict[str, Any]:
    return {"s": stream, "n": number, "t": tally.sending()}


async def receive_into(
    base_url: str,
    index: int,
    user: str,
    recorder: Recorder,
    open_receiver: OpenReceiver = open_events,
    *,
    room: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hold ``user``'s WebSocket open and record every message frame until cancelled.

    With ``room``, join it first (started once ``joined`` came back).
    """
    async with open_receiver(base_url, user=user) as client:
        if room is not None:
            await client.join(room, ref="join")
            answer = await client.receive()
            if answer.get("type") != "joined":
                raise RuntimeError(f"{user} could not join {room}: {answer}")
        task_status.started()
        try:
            while True:
                frame = await client.receive()
                if frame["type"] == "message":
                    recorder.tally.arrive(index, frame["message"])
                elif frame["type"] == "presence":
                    recorder.presence_events += 1
        except ConnectionClosed:
            # Counted, so that a slow-consumer close (4001) explains any loss it causes.
            recorder.tally.fail(f"receiver closed {client.close_code}")


async def post_stream(
    connection: SendConnection,
    stream: int,
    receivers: Sequence[str],
    tally: Tally,
    schedule: Schedule,
) -> None:
    """One HTTP stream: ``POST /send`` to the receivers in turn, one request at a time."""
    number = 0
    sender = f"sender{stream}"
    while await schedule.next_send():
        to = receivers[(stream + number) % len(receivers)]
        status, _ = await connection.send(to, _message(tally, stream, number), sender=sender)
        if status == 202:
            tally.confirm(stream, number)
        else:
            tally.fail(f"HTTP {status}")
        number += 1


async def room_stream(
    base_url: str, stream: int, room: str, tally: Tally, schedule: Schedule
) -> None:
    """One HTTP stream: ``POST /send`` to ``room``, one request at a time (a sequential
    sender goes past Hypercorn's ``keep_alive_max_requests``: the connection opens a
    new one by itself)."""
    number = 0
    sender = f"sender{stream}"
    async with open_send_connection(base_url) as connection:
        while await schedule.next_send():
            message = _message(tally, stream, number)
            status, _ = await connection.send(None, message, sender=sender, room=room)
            if status == 202:
                tally.confirm(stream, number)
            else:
                tally.fail(f"HTTP {status}")
            number += 1


async def websocket_stream(
    client: WebSocketSender,
    stream: int,
    receivers: Sequence[str],
    tally: Tally,
    schedule: Schedule,
    window: int = 1,
) -> None:
    """One WebSocket stream: ``send`` frames with up to ``window`` acks outstanding."""
    in_flight = trio.Semaphore(window)

    async def read_acks() -> None:
        while True:
            frame = await client.receive()
            if frame["type"] == "ack":
                tally.confirm(stream, int(frame["ref"]))
            elif frame["type"] == "error":
                tally.fail(f"error frame {frame['code']}")
            else:
                continue
            in_flight.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_acks)
        number = 0
        while await schedule.next_send():
            await in_flight.acquire()
            to = receivers[(stream + number) % len(receivers)]
            await client.send(to, _message(tally, stream, number), ref=str(number))
            number += 1
        for _ in range(window):
            await in_flight.acquire()
        nursery.cancel_scope.cancel()


def _item_outcome(item: Any) -> str:
    if isinstance(item, dict):
        status = item.get("status")
        if status in BATCH_ITEM_OK:
            return "ok"
        return f"item {status} {item.get('title', '')}".strip()
    return "item not an object"


async def batch_stream(
    connection: SendConnection,
    stream: int,
    receivers: Sequence[str],
    tally: Tally,
    schedule: Schedule,
    size: int,
) -> None:
    """One HTTP stream of batches: ``size`` messages per ``POST /send``, one request at a time.

    Message ``n`` of the stream goes to the same receiver as in ``post_stream``,
    so order is checked the same way. A refused batch ends the stream: the
    server does not take batches (its row becomes an error).
    """
    number = 0
    sender = f"sender{stream}"
    while await schedule.next_send():
        first = number
        items = []
        for _ in range(size):
            to = receivers[(stream + number) % len(receivers)]
            items.append({"to": to, "message": _message(tally, stream, number), "from": sender})
            number += 1
        status, body = await connection.post(json.dumps(items, separators=(",", ":")).encode())
        if status not in (200, 207):
            tally.fail(f"HTTP {status}: {body[:120].decode(errors='replace')}")
            return
        outcomes = json.loads(body)
        if not isinstance(outcomes, list) or len(outcomes) != size:
            tally.fail(f"HTTP {status}: not one outcome per item")
            return
        for offset, item in enumerate(outcomes):
            outcome = _item_outcome(item)
            if outcome == "ok":
                tally.confirm(stream, first + offset)
            else:
                tally.fail(outcome)
