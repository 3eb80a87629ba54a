"""``GET /events`` as Server-Sent Events: the WebSocket's frames where WebSockets are blocked.

Same credentials, same routing and the same :class:`~triows.connection.Connection`
(bounded queue, slow-consumer rule, drain, token expiry, the shared
``TRIOWS_MAX_CONNECTIONS`` slots) as the WebSocket; only the writer's framing
differs. Each frame is one event::

    id: <session>:<seq>-<message id>   (message frames; without a session: the message id)
    data: <the JSON frame>

There is no ``event:`` field: a browser's ``EventSource.onmessage`` sees every
frame and dispatches on its ``type``, exactly as a WebSocket client does. The
stream opens with ``retry:`` (``TRIOWS_RETRY_AFTER``), carries a ``: ping``
comment every ``TRIOWS_SSE_HEARTBEAT`` seconds when nothing is queued, and when the
server ends it (drain, token expiry, slow consumer) a last comment says why
with the WebSocket's close code (``: close 1012 ...``) next to a ``retry:``.
With sessions the hello's event id is ``<session>:<seq>`` too, so a browser's
``EventSource`` that reconnects by itself sends ``Last-Event-ID`` and resumes
its session (:mod:`triows.session`); a stream cut for any reason keeps its
session for the window. Sending stays ``POST /send``.

The encoders here are pure functions over strings (tested without sockets);
:func:`serve_event_stream` is the ASGI handler the data plane dispatches to.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import trio

from triows.asgi import Plane, Receive, Scope, Send, auth_headers, query_args, respond_problem
from triows.auth import AuthError, Identity, identify
from triows.backend import BrokerUnavailable
from triows.connection import Connection, trio_deadline
from triows.logs import log_event
from triows.protocol import (
    CLOSE_DRAINING,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_AGAIN,
    InvalidInput,
    check_room_name,
    presence_events_asked,
)
from triows.router import TooManyRooms
from triows.session import Resume, hello_for, parse_resume

EVENT_STREAM = "text/event-stream"
# Every frame triows writes starts so; the id is read without parsing the JSON.
_MESSAGE_PREFIX = '{"type":"message","id":"'
# SSE ends a line at CR, LF or CRLF; a forged delivery may hold raw line breaks
# between JSON tokens, so a frame is split the same way into data lines.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A field value may not hold a line break; an id with NUL is ignored by browsers.
_BAD_IN_ID = re.compile(r"[\r\n\0]")
_ALLOW_GET = [(b"allow", b"GET")]
# Queued like a frame (a frame is never empty JSON), written as a ``: ping`` comment.
HEARTBEAT = ""
_PING = b": ping\n\n"


def wants_event_stream(accept: str) -> bool:
    """Whether an ``Accept`` header names ``text/event-stream`` (with q above 0).

    Only the explicit type counts, not ``*/*``: ``/events`` is the WebSocket
    endpoint first, and a plain GET without the header is most likely a
    WebSocket handshake whose ``Upgrade`` a proxy dropped, better told so (406)
    than answered with a stream.
    """
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        if media_type.lower() != EVENT_STREAM:
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def requested_rooms(query_string: bytes) -> list[str]:
    """The rooms named by ``?room=`` (repeatable), in order, without repeats.

    Raises :class:`InvalidInput` for a name outside the user-name rules (a room
    is the key ``room.<name>``, with the same rules as a user's).
    """
    rooms: list[str] = []
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name != "room":
            continue
        try:
            check_room_name(value)
        except InvalidInput:
            raise InvalidInput(f"room {value!r}: room names follow the user-name rules") from None
        if value not in rooms:
            rooms.append(value)
    return rooms


def message_id(frame: str) -> str | None:
    """The ``id`` of a ``message`` frame (None for other frames, or an id unfit for ``id:``)."""
    if frame.startswith(_MESSAGE_PREFIX):
        end = frame.find('"', len(_MESSAGE_PREFIX))
        candidate = frame[len(_MESSAGE_PREFIX) : end]
        if end > 0 and "\\" not in candidate:
            return candidate
    elif not frame.startswith('{"type":"hello"'):
        # Not laid out as triows writes it (a forged but valid delivery): parse it.
        try:
            value = json.loads(frame)
        except ValueError:
            return None
        if isinstance(value, dict) and value.get("type") == "message":
            found = value.get("id")
            if isinstance(found, str) and not _BAD_IN_ID.search(found):
                return found
    return None


_SEQ_TAIL = re.compile(r',"seq":(\d+)}$')


def event_id(frame: str, session: str | None, first_seq: int) -> str | None:
    """The ``id:`` of ``frame``'s event: what ``Last-Event-ID`` brings back on a reconnect.

    In a session, ``<session>:<seq>-<message id>`` for a message and
    ``<session>:<seq>`` for the hello (the seq the stream starts after);
    without one, a message's id.
    """
    if session is None:
        return message_id(frame)
    if frame.startswith('{"type":"hello"'):
        return f"{session}:{first_seq}"
    found = message_id(frame)
    seq = _SEQ_TAIL.search(frame)
    if found is None or seq is None:
        return None
    return f"{session}:{seq.group(1)}-{found}"


def resume_of(last_event_id: bytes | None) -> Resume | None:
    """The resume a ``Last-Event-ID`` asks for; None for an id that names no session."""
    if last_event_id is None:
        return None
    session, colon, cursor = last_event_id.decode("latin-1").partition(":")
    try:
        return parse_resume(session, cursor) if colon else None
    except InvalidInput:
        return None  # an id from before sessions, or not ours: a fresh session


def encode_event(frame: str, session: str | None = None, first_seq: int = 0) -> bytes:
    """One frame as one SSE event: ``id:`` (see :func:`event_id`), then ``data:`` line(s)."""
    found = event_id(frame, session, first_seq)
    head = f"id: {found}\n" if found is not None else ""
    if "\n" in frame or "\r" in frame:
        data = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(frame))
    else:
        data = f"data: {frame}\n"
    return f"{head}{data}\n".encode()


def event_message(frame: str) -> dict[str, Any]:
    """One frame as the ASGI body chunk that carries it (the connection's writer calls this).

    :data:`HEARTBEAT` becomes a comment: ignored by ``EventSource``, it keeps
    proxies from cutting an idle stream.
    """
    body = _PING if frame == HEARTBEAT else encode_event(frame)
    return {"type": "http.response.body", "body": body, "more_body": True}


def session_event_message(session: str, first_seq: int) -> Callable[[str], dict[str, Any]]:
    """:func:`event_message` for a stream of ``session`` (event ids carry the session)."""

    def message(frame: str) -> dict[str, Any]:
        body = _PING if frame == HEARTBEAT else encode_event(frame, session, first_seq)
        return {"type": "http.response.body", "body": body, "more_body": True}

    return message


def closing_chunk(code: int, reason: str, retry_ms: int) -> bytes:
    """The last bytes of a stream the server ends: why (as a comment) and when to come back."""
    reason = _LINE_BREAK.sub(" ", reason)
    return f": close {code} {reason}\nretry: {retry_ms}\n\n".encode()


async def serve_event_stream(plane: Plane, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /events`` with ``Accept: text/event-stream`` (any other plain HTTP request too).

    Refusals are problem details: 405 not GET, 406 no ``text/event-stream`` in
    ``Accept``, 400 a bad dev-mode user name or room, 401 bad credentials, 429
    + ``Retry-After`` when the user asked for more rooms than the pace of
    ``TRIOWS_SEND_RATE`` and ``TRIOWS_SEND_BURST`` allows, 503
    + ``Retry-After`` when the instance holds ``TRIOWS_MAX_CONNECTIONS``. A
    draining instance answers a stream that ends at once with ``retry:``, so
    a browser comes back (through the load balancer, elsewhere) by itself.
    """
    settings = plane.settings
    if scope["method"] != "GET":
        await respond_problem(send, 405, "use GET", headers=_ALLOW_GET)
        return
    headers = dict(scope["headers"])
    if not wants_event_stream(headers.get(b"accept", b"").decode("latin-1")):
        await respond_problem(
            send,
            406,
            "GET /events is a WebSocket, or Server-Sent Events with Accept: text/event-stream",
            kind="not-acceptable",
        )
        return
    args = query_args(scope)
    try:
        identity = identify(
            settings.secret,
            auth_headers(headers),
            args,
            dev_user=args.get("user"),
            leeway=settings.jwt_leeway,
        )
        rooms = requested_rooms(scope.get("query_string", b""))
        resume = parse_resume(args.get("session"), args.get("last")) or resume_of(
            headers.get(b"last-event-id")
        )
        presence_events = presence_events_asked(args.get("presence"))
    except InvalidInput as error:
        await respond_problem(send, 400, str(error), kind="invalid")
        return
    except AuthError as error:
        log_event("auth_failed", path="/events", transport="sse", reason=str(error))
        await respond_problem(
            send, 401, str(error), kind="unauthorized", headers=[(b"www-authenticate", b"Bearer")]
        )
        return
    if len(rooms) > settings.max_rooms:
        await respond_problem(
            send, 400, f"at most {settings.max_rooms} rooms per stream", kind="invalid"
        )
        return
    refused = [room for room in rooms if not identity.may_use_room(room)]
    if refused:
        await respond_problem(
            send, 403, f"the token does not allow room {refused[0]!r}", kind="forbidden"
        )
        return
    # Each room is a subscribe and an unsubscribe on the broker: paced per
    # user like a WebSocket's joins, since every GET is a new connection.
    joins = plane.app.stream_joins
    wait = joins.take(identity.user, len(rooms), trio.current_time()) if rooms else 0.0
    if wait:
        await respond_problem(
            send,
            429,
            f"rooms are joined at most {settings.send_rate:g} a second "
            f"(bursts of {settings.send_burst}) per user",
            headers=[(b"retry-after", str(math.ceil(wait)).encode())],
        )
        return
    wait = plane.session_wait(identity.user)
    if wait:
        await respond_problem(
            send,
            429,
            plane.session_rate_detail(),
            headers=[(b"retry-after", str(math.ceil(wait)).encode())],
        )
        return
    retry_ms = 1000 * settings.retry_after
    if plane.app.draining:
        await start_stream(send)
        await end_stream(send, closing_chunk(CLOSE_DRAINING, "instance draining", retry_ms))
        return
    if not plane.reserve_slot("sse"):
        await respond_problem(send, 503, plane.full_detail(), **plane.full_refusal())
        return
    try:
        await start_stream(send, f"retry: {retry_ms}\n\n".encode())
        await run_stream(plane, identity, rooms, receive, send, resume, presence_events)
    finally:
        plane.slots_taken -= 1


async def run_stream(
    plane: Plane,
    identity: Identity,
    rooms: list[str],
    receive: Receive,
    send: Send,
    resume: Resume | None = None,
    presence_events: bool = False,
) -> None:
    """Run one accepted event stream, a member of ``rooms``, until it ends, whoever ends it.

    Its session (if the backend holds sessions) is resumed or opened first;
    a stream that ends leaves it to wait for a resume within the window
    (an event stream has no normal close a client could send).
    """
    settings = plane.settings
    user = identity.user
    connection = Connection(user, settings.send_queue)
    connection.presence_events = presence_events
    heartbeat = settings.sse_heartbeat
    link = None
    try:
        async with plane.app.router.attached(connection):
            link = await plane.open_link(connection, resume, identity)
            try:
                for room in rooms:
                    if link is not None:
                        await link.join(room, settings.max_rooms)
                    else:
                        await plane.app.router.join(connection, room)
            except BrokerUnavailable:
                # Without a session only while draining: the stream ends with 1012 like the others.
                code = CLOSE_DRAINING if link is None else CLOSE_TRY_AGAIN
                connection.close(code, "instance draining, reconnect")
            except TooManyRooms:
                pass  # the rooms resumed and asked for are over the bound: those first are kept
            connection.offer(hello_for(user, settings.instance_id, link))
            writes: Callable[[str], dict[str, Any]] = event_message
            if link is not None:
                writes = session_event_message(link.token, link.seq)
                link.start()
            log_event("connect", user=user, connection=connection.id, transport="sse")
            connection.start_writing(plane.app.nursery, send, writes)
            try:
                with trio.CancelScope(deadline=trio_deadline(identity.expires_at)) as reading:
                    connection.read_under(reading)
                    await wait_for_disconnect(receive, connection, heartbeat or math.inf)
                if reading.cancelled_caught and not connection.stopped:
                    connection.close(CLOSE_TOKEN_EXPIRED, "token expired")
            finally:
                # If nobody started closing, the peer went away: stop writing.
                try:
                    await connection.finish(settings.close_timeout)
                finally:
                    if link is not None:
                        await link.close(end=False)
        if connection.flushed and connection.close_code is not None:
            retry_ms = 1000 * settings.retry_after
            if connection.close_code == CLOSE_DRAINING:
                # Jittered up to double: a drained instance's browsers do not all return at once.
                retry_ms = random.randint(retry_ms, 2 * retry_ms)
            chunk = closing_chunk(connection.close_code, connection.close_reason, retry_ms)
            with trio.move_on_after(settings.close_timeout):
                await end_stream(send, chunk)
    finally:
        log_event(
            "disconnect",
            user=user,
            connection=connection.id,
            transport="sse",
            code=connection.close_code or "client",
            reason=connection.close_reason,
        )


async def wait_for_disconnect(receive: Receive, connection: Connection, heartbeat: float) -> None:
    """Read the request to its end and wait for ``http.disconnect`` (a body is discarded).

    Every ``heartbeat`` seconds, if nothing is queued or being written, a
    heartbeat is queued: the stream has no writer task while idle.
    """
    while True:
        with trio.move_on_after(heartbeat) as waiting:
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        if waiting.cancelled_caught and connection.idle:
            connection.offer(HEARTBEAT)


async def start_stream(send: Send, first: bytes = b"") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                # nginx buffers proxied responses unless told not to.
                (b"x-accel-buffering", b"no"),
            ],
        }
    )
    if first:
        await send({"type": "http.response.body", "body": first, "more_body": True})


async def end_stream(send: Send, last: bytes) -> None:
    await send({"type": "http.response.body", "body": last, "more_body": False})
