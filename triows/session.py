"""Sessions: a connection's messages held at the broker, so that a reconnect resumes them.

Each WebSocket or event stream belongs to a session: a queue at the broker
(:class:`triows.backend.SessionQueue`) bound to the user's key and to the keys
of the rooms it joined. The connection consumes it with manual acks and acks a
message once its frame is written to the socket, numbering the frames it
writes (``seq``, one more per frame). When the connection goes without a
normal close, or its instance drains or dies, what was not acked goes back to
the queue and the queue waits there for ``TRIOWS_RESUME_WINDOW``; a new
connection of the same user that presents the session's token resumes it, on
any instance: the queue's messages first, in order, then live ones.

The token is 128 random bits; the queue is named by a hash of the user and
the token, so a token presented by another user names a queue that does not
exist, and that user gets a fresh session.

Duplicates. An instance acks what it wrote; if it dies between writing and
acking, the broker gives those messages back, although the client saw them.
The client's cursor (``last``: the ``seq`` of the last frame it saw, and that
frame's message id) settles it: the resuming connection holds the messages
given back (flagged *redelivered*, at the head of the queue) until it has seen
either the message of the cursor's id (it and those before it are skipped) or
the end of what was given back (none was seen).

The same happens when the instance's own broker connection is lost: what
the connection had not acked comes back, redelivered, on the next one. The
link remembers the ids of the last ``TRIOWS_SESSION_PREFETCH`` frames it
wrote (no more can be unacked at once) and skips a redelivery of one of them.

Rooms. The session's rooms live in the queue too, as its *note*
(:meth:`triows.backend.SessionQueue.note`, ``{"rooms": [...]}``), which the
connection keeps unacked; a resume finds it among what comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from triows.backend import LOST_KEY, NOTE_KEY, SessionDelivery, SessionQueue, Sessions
from triows.logs import log_event
from triows.protocol import (
    CLOSE_DRAINING,
    InvalidInput,
    check_room_name,
    hello_frame,
    room_key,
    user_key,
)
from triows.router import TooManyRooms

if TYPE_CHECKING:
    from triows.connection import Connection
    from triows.router import Router

TOKEN_BYTES = 16
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")
# ``last``: the seq of the last frame seen, optionally ``-`` and that frame's message id.
_CURSOR = re.compile(r"(\d{1,15})(?:-([0-9a-f]{32}))?")


@dataclass(frozen=True, slots=True)
class Resume:
    """What a reconnecting client presents: its session's token and its cursor."""

    token: str
    last_seq: int
    last_id: str | None


def parse_resume(token: str | None, last: str | None) -> Resume | None:
    """The resume a client asked for (``?session=&last=`` or SSE ``Last-Event-ID``), or None.

    Raises :class:`InvalidInput` for a malformed token or cursor.
    """
    if token is None:
        if last is not None:
            raise InvalidInput("'last' needs 'session'")
        return None
    if not _TOKEN.fullmatch(token):
        raise InvalidInput("'session' is not a session token")
    if last is None:
        return Resume(token, 0, None)
    match = _CURSOR.fullmatch(last)
    if match is None:
        raise InvalidInput("'last' is a frame's seq, or its seq, '-' and its message id")
    return Resume(token, int(match.group(1)), match.group(2))


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def queue_name(exchange: str, user: str, token: str) -> str:
    """The broker queue of ``user``'s session ``token``: another user's name gives another."""
    digest = hashlib.blake2b(f"{user}\n{token}".encode(), digest_size=16).hexdigest()
    return f"{exchange}.session.{digest}"


def with_seq(frame: str, seq: int) -> str:
    """``frame`` (a JSON object) with ``"seq"`` added as its last member."""
    return f'{frame[:-1]},"seq":{seq}}}'


class SessionLink:
    """One connection's side of its session: numbers, writes and acks what the queue hands over.

    Deliveries that arrive before :meth:`start` (the hello goes first) wait
    here; there are at most ``TRIOWS_SESSION_PREFETCH`` of them. A resume
    waits for what the broker gave back (:meth:`wait_prefix`), drops what the
    client saw (:meth:`settle`), and then the hello says how much it missed.
    """

    __slots__ = (
        "_acks_waiting",
        "_note_tag",
        "_pending",
        "_prefix_seen",
        "_router",
        "_written",
        "connection",
        "missed",
        "queue",
        "resume",
        "resumed",
        "rooms",
        "seq",
        "token",
    )

    def __init__(
        self, connection: Connection, router: Router, token: str, resume: Resume | None
    ) -> None:
        self.connection = connection
        self._router = router
        self.token = token
        self.resume = resume
        self.resumed = False
        self.missed = 0
        self.seq = resume.last_seq if resume is not None else 0
        self.queue: SessionQueue | None = None
        self.rooms: set[str] = set()
        self._note_tag: int | None = None
        self._pending: list[SessionDelivery] | None = []
        # Acks asked for while the queue was still opening.
        self._acks_waiting: list[int] | None = None
        # Digests of the last frames written (made with the first one).
        self._written: _Recent | None = None
        # A resume's: set once it knows where what came back ends (see the module docstring).
        self._prefix_seen = trio.Event() if resume is not None else None

    # Called by the backend, in queue order; never blocks.

    def deliver(self, delivery: SessionDelivery) -> None:
        if delivery.key == NOTE_KEY:
            self._take_note(delivery)
        elif delivery.key == LOST_KEY:
            self.connection.close(CLOSE_DRAINING, "the session's consumer was lost: resume")
        elif self._pending is not None:
            self._pending.append(delivery)
            self._check_prefix()
        else:
            self._write(delivery)

    def _ack(self, tag: int) -> None:
        if self.queue is not None:
            self.queue.ack(tag)
        elif self._acks_waiting is None:
            self._acks_waiting = [tag]
        else:
            self._acks_waiting.append(tag)

    def _take_note(self, delivery: SessionDelivery) -> None:
        try:
            rooms = json.loads(delivery.body)["rooms"]
            checked = {check_room_name(room) for room in rooms}
        except (ValueError, KeyError, TypeError):
            self._ack(delivery.tag)  # not a note this server wrote
            return
        if self._note_tag is not None:
            self._ack(self._note_tag)  # only the latest is kept
        self._note_tag = delivery.tag
        if self._pending is not None:
            # Still resuming: the note says which rooms the session joined.
            self.rooms = checked

    def _check_prefix(self) -> None:
        pending, seen = self._pending, self._prefix_seen
        if pending is None or seen is None or seen.is_set() or self.queue is None:
            return
        last_id = self.resume.last_id if self.resume is not None else None
        if (
            last_id is None
            or self.queue.waiting == 0
            or (
                pending
                and (
                    not pending[-1].redelivered
                    or _holds_id(pending[-1].body, last_id)
                    or len(pending) >= self.queue.waiting
                    or len(pending) >= self._router.session_prefetch
                )
            )
        ):
            seen.set()

    def attach(self, queue: SessionQueue) -> None:
        """The queue, once opened: acks held while it was opening go out."""
        self.queue = queue
        for tag in self._acks_waiting or ():
            queue.ack(tag)
        self._acks_waiting = None
        self._check_prefix()

    async def wait_prefix(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until what the broker gave back has come (resume only)."""
        if self._prefix_seen is None:
            return
        with trio.move_on_after(timeout):
            await self._prefix_seen.wait()

    def settle(self) -> None:
        """Drop what the client saw from what came back, and count what it missed (resume)."""
        pending = self._pending or []
        skip = 0
        last_id = self.resume.last_id if self.resume is not None else None
        if last_id is not None:
            for index, delivery in enumerate(pending):
                if not delivery.redelivered:
                    break
                if _holds_id(delivery.body, last_id):
                    skip = index + 1
                    break
        for delivery in pending[:skip]:
            self._ack(delivery.tag)  # the client saw it before the instance could ack it
        del pending[:skip]
        if self.queue is not None:
            notes = 0 if self._note_tag is None else 1
            self.missed = max(0, self.queue.waiting - notes - skip)

    def start(self) -> None:
        """The hello is queued: write what waited, then whatever comes."""
        pending, self._pending = self._pending or [], None
        for delivery in pending:
            self._write(delivery)

    def _write(self, delivery: SessionDelivery) -> None:
        written = self._written
        if delivery.redelivered and written is not None and delivery.body in written:
            self._ack(delivery.tag)  # written before this instance's broker connection went
            return
        frame = self._router.checked_frame(delivery.key, delivery.body)
        if frame is None:
            self._ack(delivery.tag)  # dropped and counted by the router
            return
        seq = self.seq + 1
        if self.connection.offer(with_seq(frame, seq), delivery.tag):
            self.seq = seq
            self._router.count_delivered(delivery.key)
            if written is None:
                written = self._written = _Recent(self._router.session_prefetch)
            written.add(delivery.body)
        # Otherwise the connection is closing: left unacked, the queue gets it back.

    def written(self, tag: int) -> None:
        """The connection wrote the frame of delivery ``tag``: done with it."""
        self._ack(tag)

    # Rooms

    async def join(self, room: str, max_rooms: int) -> None:
        """Hold ``room``'s messages; raises :class:`TooManyRooms` or ``BrokerUnavailable``."""
        if room in self.rooms:
            return
        if len(self.rooms) >= max_rooms:
            raise TooManyRooms(f"a connection may be in at most {max_rooms} rooms")
        assert self.queue is not None
        self.rooms.add(room)
        try:
            with trio.CancelScope(shield=True):
                await self.queue.bind(room_key(room))
                await self._write_note()
        except BaseException:
            self.rooms.discard(room)
            raise
        with trio.CancelScope(shield=True):
            await self._router.presence.add(self.connection, room)

    async def leave(self, room: str) -> None:
        if room not in self.rooms:
            return
        assert self.queue is not None
        self.rooms.discard(room)
        with trio.CancelScope(shield=True):
            await self._router.presence.remove(self.connection, room)
            await self.queue.unbind(room_key(room))
            await self._write_note()

    async def _write_note(self) -> None:
        assert self.queue is not None
        await self.queue.note(json.dumps({"rooms": sorted(self.rooms)}).encode())

    async def rejoin(self) -> None:
        """A resume: the session's rooms (from its note) are this connection's, without events."""
        presence = self._router.presence
        with trio.CancelScope(shield=True):
            for room in self.rooms:
                await presence.add(self.connection, room, announce=False)
            await presence.resumed(self.token)

    async def close(self, *, end: bool) -> None:
        """Leave the session to wait for a resume (``end`` False) or delete it. Never raises.

        Its rooms are left at once when it ends; otherwise presence holds them
        for the window (a resume is neither a leave nor a join).
        """
        queue = self.queue
        if queue is None:
            return
        presence = self._router.presence
        with trio.CancelScope(shield=True):
            for room in self.rooms:
                await presence.remove(self.connection, room, hold=not end)
            if end:
                await queue.end()
            else:
                presence.hold(self.connection.user, self.token, self.rooms)
                await queue.detach()


class _Recent:
    """The last ``size`` bodies written, as 64-bit digests in a ring (``size`` * 8 bytes).

    A frame's body holds its unique message id; it is looked up only for a
    redelivery (rare), so a linear scan in C is enough.
    """

    __slots__ = ("_next", "_ring")

    def __init__(self, size: int) -> None:
        self._ring = array("q", bytes(8 * size))
        self._next = 0

    def add(self, body: bytes) -> None:
        self._ring[self._next] = _digest(body)
        self._next = (self._next + 1) % len(self._ring)

    def __contains__(self, body: bytes) -> bool:
        return _digest(body) in self._ring


def _digest(body: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little", signed=True)


def _holds_id(body: bytes, message_id: str) -> bool:
    return f'"id":"{message_id}"'.encode() in body


async def open_session(
    sessions: Sessions,
    connection: Connection,
    router: Router,
    exchange: str,
    resume: Resume | None,
    timeout: float,
) -> SessionLink:
    """Resume ``resume``'s session of ``connection.user``, or open a fresh one.

    Raises ``BrokerUnavailable``. The caller queues the hello, then calls
    :meth:`SessionLink.start`, and :meth:`SessionLink.close` when done.
    """
    user = connection.user
    if resume is not None:
        link = SessionLink(connection, router, resume.token, resume)
        name = queue_name(exchange, user, resume.token)
        queue = await sessions.open(name, user_key(user), link.deliver, resume=True)
        if queue is not None:
            link.resumed = True
            link.attach(queue)
            await link.wait_prefix(timeout)
            link.settle()
            connection.session = link
            await link.rejoin()
            return link
        log_event("session_unknown", level=logging.INFO, user=user, connection=connection.id)
    link = SessionLink(connection, router, new_token(), None)
    name = queue_name(exchange, user, link.token)
    queue = await sessions.open(name, user_key(user), link.deliver, resume=False)
    assert queue is not None  # made when not resuming
    link.attach(queue)
    connection.session = link
    return link


def hello_for(user: str, instance: str, link: SessionLink | None) -> str:
    """The hello of a connection with session ``link`` (None: not resumable)."""
    if link is None:
        return hello_frame(user, instance)
    return hello_frame(user, instance, link.token, resumed=link.resumed, missed=link.missed)
