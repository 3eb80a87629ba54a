"""The data plane: ``POST /send`` and the ``/events`` WebSocket as plain ASGI handlers.

:class:`DataPlane` wraps the Quart app's ``asgi_app`` (the usual Quart/Flask
middleware pattern): the two routes that carry every message are answered here
without Quart's request and websocket contexts; every other request (page,
probes, metrics, error pages) and the lifespan go on to Quart.

Per WebSocket the handler task itself reads the client's frames, a writer
task runs only while the outbound queue holds frames (in the app's nursery,
see :mod:`triows.connection`), and the token's expiry is the reader's
deadline on the Trio clock: an idle socket has no task, nursery or event of
its own besides the handler.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import trio
from wsproto.extensions import PerMessageDeflate

from triows import presence_http, sse
from triows.asgi import (
    ASGIApp,
    Host,
    Message,
    Receive,
    Refused,
    Scope,
    Send,
    auth_headers,
    authenticate,
    query_args,
    respond,
    respond_problem,
)
from triows.auth import AuthError, Identity, identify
from triows.backend import BrokerUnavailable, Outcome
from triows.connection import Connection, trio_deadline
from triows.logs import log_event
from triows.problems import PROBLEM_CONTENT_TYPE, problem_document
from triows.protocol import (
    CLOSE_INVALID_FRAME,
    CLOSE_NORMAL,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_LARGE,
    CLOSE_TRY_AGAIN,
    InvalidInput,
    InvalidSendFrame,
    MessageTooLarge,
    PresenceRequest,
    ProtocolViolation,
    RoomRequest,
    SendRequest,
    ack_frame,
    check_body_tokens,
    check_tokens,
    error_frame,
    joined_frame,
    json_tokens,
    left_frame,
    parse_client_frame,
    parse_send_batch,
    parse_send_body,
    presence_events_asked,
    presence_frame,
)
from triows.router import TooManyRooms
from triows.session import Resume, SessionLink, hello_for, open_session, parse_resume
from triows.websecurity import origin_allowed

# Items of one batch published at the same time (each waits for its broker confirm).
BATCH_CONCURRENCY = 16
JSON_CONTENT_TYPE = b"application/json"
# What a client is told when the broker fails; the broker's address stays in the server's log.
BROKER_UNAVAILABLE = "the broker is unavailable: retry later"
FULL_DETAIL = "the recipient is away and its session holds as many messages as it may: retry later"
ORIGIN_REFUSED = (
    "a page of this origin may not open /events on this server (TRIOWS_ALLOWED_ORIGINS)"
)


def shielded(send: Send) -> Send:
    """``send`` shielded from the caller's cancellation.

    Quart-trio cancels its request nursery as soon as the response is sent,
    while Hypercorn is still inside the last ``send``: restarting the
    connection's keep-alive timer there. Cancelled, the timer never restarts
    and an idle keep-alive connection stays open for good (measured: still
    open after 60 s; 5 s with this). A stuck peer's write stays bounded by the
    write deadline of ``triows serve``.
    """

    async def send_shielded(message: Any) -> None:
        with trio.CancelScope(shield=True):
            await send(message)

    return send_shielded


class DataPlane:
    """ASGI middleware answering ``/send`` and ``/events`` in front of ``inner`` (Quart)."""

    def __init__(self, app: Host, inner: ASGIApp) -> None:
        self.app = app
        self.inner = inner
        self.settings = app.settings
        # WebSocket slots taken, counted from the check on: a handshake reserves
        # its slot before its first await, so concurrent ones cannot overshoot.
        self.slots_taken = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind, path = scope["type"], scope.get("path")
        if kind == "http" and path == "/send":
            await self.post_send(scope, receive, send)
        elif path == "/events" and not origin_allowed(
            scope["headers"], self.settings.allowed_origins
        ):
            await refuse_cross_origin(scope, send)
        elif kind == "websocket" and path == "/events":
            await self.events(scope, receive, send)
        elif kind == "http" and path == "/events":
            await sse.serve_event_stream(self, scope, receive, send)
        elif kind == "http" and path == "/presence":
            await presence_http.serve_presence(self.app, scope, receive, shielded(send))
        elif kind == "websocket" and path == "/_echo" and self.settings.test_echo:
            await echo(receive, send)
        elif kind == "http":
            await self.inner(scope, receive, shielded(send))
        else:
            await self.inner(scope, receive, send)

    def reserve_slot(self, transport: str) -> bool:
        """Take a WebSocket/SSE slot, or log and return False when all are taken.

        No await between the check and the count, so concurrent handshakes
        cannot overshoot; the caller gives the slot back (``slots_taken -= 1``).
        """
        if self.slots_taken >= self.settings.max_connections:
            log_event(
                "connection_refused",
                level=logging.WARNING,
                reason="max_connections",
                transport=transport,
            )
            return False
        self.slots_taken += 1
        return True

    def full_detail(self) -> str:
        return f"this instance holds its maximum of {self.settings.max_connections} connections"

    def full_refusal(self) -> dict[str, Any]:
        """The problem kind and headers of a refusal for want of a slot."""
        retry_after = str(self.settings.retry_after).encode()
        return {"kind": "too-many-connections", "headers": [(b"retry-after", retry_after)]}

    # POST /send

    async def post_send(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        headers = dict(scope["headers"])
        try:
            # The credentials are in the head: refused before any of the body
            # is read, so a stranger holds no memory or time here.
            identity = await authenticate(settings, scope, send, close=True)
        except Refused:
            return
        limit = max(settings.max_message_bytes, settings.max_batch_bytes)
        # The body is read (up to the limit) before any other answer, so an
        # early 415 leaves the keep-alive connection ready for the next request.
        try:
            raw = await read_body(receive, limit, settings.body_timeout)
        except RequestAborted:
            log_event("request_aborted", path="/send")
            return  # half a request is not a request; nobody is left to answer
        except BodyTooSlow as error:
            log_event("body_timeout", level=logging.WARNING, path="/send")
            await respond_problem(send, 408, str(error), kind="body-timeout", close=True)
            return
        if raw is None:
            await respond_problem(
                send, 413, f"the body is limited to {limit} bytes", kind="too-large", close=True
            )
            return
        if scope["method"] != "POST":
            await respond_problem(send, 405, "use POST", headers=[(b"allow", b"POST")])
            return
        mimetype = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
        if mimetype != JSON_CONTENT_TYPE:
            await respond_problem(send, 415, "send a JSON body with Content-Type: application/json")
            return
        try:
            # Counted in C before any parsing: what a body costs to parse is bounded.
            check_body_tokens(raw, settings.max_json_tokens)
            batch = parse_send_batch(raw, dev_mode=settings.dev_mode, max_items=settings.max_batch)
            if batch is None:
                if len(raw) > settings.max_message_bytes:
                    raise MessageTooLarge(
                        f"the body is {len(raw)} bytes; the limit is {settings.max_message_bytes}"
                    )
                single = parse_send_body(raw, dev_mode=settings.dev_mode)
        except MessageTooLarge as error:
            await respond_problem(send, 413, str(error), kind="too-large")
            return
        except InvalidInput as error:
            await respond_problem(send, 400, str(error), kind="invalid")
            return
        user = identity.user if identity is not None else None
        if batch is not None:
            outcomes = await self.send_batch(user, batch, identity)
            await respond(send, 207, json.dumps(outcomes).encode(), JSON_CONTENT_TYPE)
            return
        send_request, dev_sender = single
        status, document = await self.send_one(user or dev_sender, send_request, identity)
        if status == 202:
            await respond(send, 202, json.dumps(document).encode(), JSON_CONTENT_TYPE)
            return
        extra = [(b"retry-after", str(settings.retry_after).encode())] if status == 503 else []
        await respond(
            send, status, json.dumps(document).encode(), PROBLEM_CONTENT_TYPE.encode(), extra
        )

    async def send_one(
        self, sender: str | None, request: SendRequest, identity: Identity | None = None
    ) -> tuple[int, Message]:
        """Publish one message: (202, id and outcome) or (4xx/503, problem details).

        A room message needs the room in ``identity``'s ``rooms`` claim (None: dev mode).
        """
        room = request.room
        if room is not None and identity is not None and not identity.may_use_room(room):
            detail = f"the token does not allow room {room}"
            return 403, problem_document(403, detail, kind="forbidden")
        try:
            message_id, outcome = await self.app.router.send(sender, request)
        except MessageTooLarge as error:
            return 413, problem_document(413, str(error), kind="too-large")
        except InvalidInput as error:
            return 400, problem_document(400, str(error), kind="invalid")
        except BrokerUnavailable:
            # Why (with the broker's address) is in the router's publish_failed log line.
            return 503, problem_document(503, BROKER_UNAVAILABLE, kind="broker-unavailable")
        if outcome is Outcome.UNROUTED:
            return 404, problem_document(404, offline_detail(request), kind="offline")
        if outcome is Outcome.FULL:
            return 503, problem_document(503, FULL_DETAIL, kind="recipient-full")
        return 202, {"id": message_id, "status": outcome.value}

    async def send_batch(
        self,
        user: str | None,
        batch: list[tuple[SendRequest, str | None] | InvalidInput],
        identity: Identity | None = None,
    ) -> list[Message]:
        """Publish a batch, ``BATCH_CONCURRENCY`` at a time; each item's outcome, in order."""
        outcomes: list[Message] = [{} for _ in batch]

        async def publish(indices: Iterator[int]) -> None:
            for index in indices:
                item = batch[index]
                if isinstance(item, InvalidInput):
                    document = problem_document(400, str(item), kind="invalid")
                    outcomes[index] = {"status": 400, "error": document}
                    continue
                request, dev_sender = item
                status, document = await self.send_one(user or dev_sender, request, identity)
                if status != 202:
                    document = {"status": status, "error": document}
                outcomes[index] = document

        indices = iter(range(len(batch)))
        async with trio.open_nursery() as nursery:
            for _ in range(min(BATCH_CONCURRENCY, len(batch))):
                nursery.start_soon(publish, indices)
        return outcomes

    # GET /events (WebSocket)

    async def events(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The "websocket.connect" message is skipped by the reader (Quart's test client sends none).
        settings = self.settings
        args = query_args(scope)
        try:
            identity = identify(
                settings.secret,
                auth_headers(dict(scope["headers"])),
                args,
                dev_user=args.get("user"),
                leeway=settings.jwt_leeway,
            )
            resume = parse_resume(args.get("session"), args.get("last"))
            presence_events = presence_events_asked(args.get("presence"))
        except InvalidInput as error:
            await refuse(scope, send, 400, str(error), kind="invalid")
            return
        except AuthError as error:
            log_event("auth_failed", path="/events", reason=str(error))
            await refuse(scope, send, 401, str(error), kind="unauthorized")
            return
        if self.app.draining:
            await refuse(scope, send, 503, "this instance is draining", kind="draining")
            return
        wait = self.session_wait(identity.user)
        if wait:
            await refuse(scope, send, 429, self.session_rate_detail(), **retry_after(wait))
            return
        if not self.reserve_slot("websocket"):
            await refuse(scope, send, 503, self.full_detail(), **self.full_refusal())
            return
        try:
            await send({"type": "websocket.accept"})
            await self.serve_connection(identity, receive, send, resume, presence_events)
        finally:
            self.slots_taken -= 1

    def session_wait(self, user: str) -> float:
        """Seconds ``user`` must wait before opening another session (0: now).

        Each session (new or resumed) is a queue made or taken over at the
        broker, so they are paced per user like joins (``TRIOWS_SEND_RATE``,
        bursts of ``TRIOWS_SEND_BURST``).
        """
        if not self.sessions_on:
            return 0.0
        return self.app.session_opens.take(user, 1, trio.current_time())

    def session_rate_detail(self) -> str:
        settings = self.settings
        return (
            f"a user opens at most {settings.send_rate:g} connections a second "
            f"(bursts of {settings.send_burst})"
        )

    @property
    def sessions_on(self) -> bool:
        return bool(self.settings.resume_window) and self.app.router.backend.sessions is not None

    async def open_link(
        self, connection: Connection, resume: Resume | None, identity: Identity
    ) -> SessionLink | None:
        """Open (or resume) ``connection``'s session; None without sessions.

        Rooms the session joined that ``identity`` no longer allows are left.
        When the broker is unavailable the connection is closed with 1013
        (try again later): a resume token stays good for the next try.
        """
        sessions = self.app.router.backend.sessions
        if not self.settings.resume_window or sessions is None:
            return None
        try:
            link = await open_session(
                sessions,
                connection,
                self.app.router,
                self.settings.exchange,
                resume,
                self.settings.broker_timeout,
            )
        except BrokerUnavailable:
            connection.close(CLOSE_TRY_AGAIN, BROKER_UNAVAILABLE)
            return None
        for room in sorted(link.rooms):
            if not identity.may_use_room(room):
                with trio.move_on_after(self.settings.broker_timeout):
                    await link.leave(room)
        return link

    async def serve_connection(
        self,
        identity: Identity,
        receive: Receive,
        send: Send,
        resume: Resume | None = None,
        presence_events: bool = False,
    ) -> None:
        """Run one accepted WebSocket until it closes, whoever closes it.

        Its session (if the backend holds sessions) is resumed or opened
        before the hello; when the connection ends, a normal close by the
        client (1000) or a protocol violation ends the session, and any other
        end leaves it to wait for a resume within ``TRIOWS_RESUME_WINDOW``.
        """
        settings = self.settings
        connection = Connection(identity.user, settings.send_queue)
        connection.presence_events = presence_events
        deadline = trio_deadline(identity.expires_at)
        client_code: int | None = None
        link: SessionLink | None = None
        try:
            async with self.app.router.attached(connection):
                link = await self.open_link(connection, resume, identity)
                connection.offer(hello_for(identity.user, settings.instance_id, link))
                if link is not None:
                    link.start()
                log_event(
                    "connect",
                    user=identity.user,
                    connection=connection.id,
                    resumed=link is not None and link.resumed,
                )
                connection.start_writing(self.app.nursery, send)
                try:
                    with trio.CancelScope(deadline=deadline) as reading:
                        connection.read_under(reading)
                        client_code = await self.read_frames(connection, receive, identity, link)
                    if reading.cancelled_caught and not connection.stopped:
                        connection.close(CLOSE_TOKEN_EXPIRED, "token expired")
                finally:
                    # If nobody started closing, the peer went away: stop writing.
                    try:
                        await connection.finish(settings.close_timeout)
                    finally:
                        if link is not None:
                            ended = client_code == CLOSE_NORMAL or connection.close_code in (
                                CLOSE_INVALID_FRAME,
                                CLOSE_TOO_LARGE,
                            )
                            await link.close(end=ended)
            if connection.flushed and connection.close_code is not None:
                with trio.move_on_after(settings.close_timeout):
                    await send(
                        {
                            "type": "websocket.close",
                            "code": connection.close_code,
                            "reason": connection.close_reason,
                        }
                    )
        finally:
            log_event(
                "disconnect",
                user=identity.user,
                connection=connection.id,
                code=connection.close_code or "client",
                reason=connection.close_reason,
                client_code=client_code,
            )

    async def read_frames(
        self,
        connection: Connection,
        receive: Receive,
        identity: Identity | None = None,
        link: SessionLink | None = None,
    ) -> int | None:
        """Read the client's frames and answer each: ``ack``, ``joined``, ``left`` or ``error``.

        Returns the close code of a client that went away (None: the server closed).

        One frame is handled at a time (its publish or subscribe is awaited
        before the next frame is read), and at most ``TRIOWS_SEND_RATE`` frames
        per second with bursts of ``TRIOWS_SEND_BURST``, joins and leaves
        included, a frame with much JSON structure counting as several
        (``TRIOWS_SEND_COST_TOKENS``): a client that sends faster is slowed by TCP back-pressure on
        its own socket, never anyone else's. ``identity`` says which rooms the
        connection may join or send to (None: any).
        """
        settings = self.settings
        limit = settings.max_message_bytes
        rate, burst = settings.send_rate, float(settings.send_burst)
        tokens, refilled = burst, trio.current_time()
        while True:
            message = await receive()
            if message["type"] == "websocket.connect":
                continue
            if message["type"] != "websocket.receive":
                code: int | None = message.get("code")  # websocket.disconnect: the peer is gone
                return code
            data = message.get("text")
            if data is None:
                connection.close(CLOSE_INVALID_FRAME, "binary frames are not part of the protocol")
                return None
            # A character is at most 4 bytes in UTF-8: encode only a frame that could be over.
            if len(data) > limit or (len(data) * 4 > limit and len(data.encode()) > limit):
                log_event("frame_too_large", level=logging.WARNING, user=connection.user)
                connection.close(CLOSE_TOO_LARGE, f"frames are limited to {limit} bytes")
                return None
            # A frame costs one send plus one per ``send_cost_tokens`` of structure,
            # paid before it is parsed: costly JSON slows its sender down.
            structure = json_tokens(data)
            cost = 1 + structure // settings.send_cost_tokens
            now = trio.current_time()
            tokens = min(burst, tokens + (now - refilled) * rate)
            refilled = now
            if tokens < cost:
                await trio.sleep((cost - tokens) / rate)
                tokens, refilled = float(cost), trio.current_time()
            tokens -= cost
            try:
                check_tokens(structure, settings.max_json_tokens)
                request = parse_client_frame(data)
            except MessageTooLarge as error:
                connection.offer(error_frame(None, "too_large", str(error)))
                continue
            except ProtocolViolation as error:
                log_event(
                    "invalid_frame", level=logging.WARNING, user=connection.user, reason=str(error)
                )
                connection.close(CLOSE_INVALID_FRAME, str(error))
                return None
            except InvalidSendFrame as error:
                connection.offer(error_frame(error.ref, "invalid", str(error)))
                continue
            if isinstance(request, RoomRequest):
                connection.offer(await self.answer_room(connection, request, identity, link))
            elif isinstance(request, PresenceRequest):
                connection.offer(await self.answer_presence(request, identity))
            else:
                connection.offer(await self.answer_send(connection.user, request, identity))

    async def answer_room(
        self,
        connection: Connection,
        request: RoomRequest,
        identity: Identity | None,
        link: SessionLink | None = None,
    ) -> str:
        """Join or leave a room; return the ``joined``/``left`` or ``error`` frame.

        ``joined`` is answered once the room's key is subscribed on the broker,
        so every room message sent after it reaches this connection.
        """
        ref, room = request.ref, request.room
        if request.action == "leave":
            if link is not None:
                try:
                    await link.leave(room)
                except BrokerUnavailable:
                    return error_frame(ref, "unavailable", BROKER_UNAVAILABLE)
            else:
                await self.app.router.leave(connection, room)
            return left_frame(ref, room)
        if identity is not None and not identity.may_use_room(room):
            return error_frame(ref, "forbidden", f"the token does not allow room {room}")
        try:
            if link is not None:
                await link.join(room, self.settings.max_rooms)
            else:
                await self.app.router.join(connection, room)
        except TooManyRooms as error:
            return error_frame(ref, "too_many_rooms", str(error))
        except BrokerUnavailable:
            return error_frame(ref, "unavailable", BROKER_UNAVAILABLE)
        # DEBUG: a line per join is a flood under churn; connect and disconnect stay INFO.
        log_event(
            "join", level=logging.DEBUG, user=connection.user, connection=connection.id, room=room
        )
        return joined_frame(ref, room)

    async def answer_presence(self, request: PresenceRequest, identity: Identity | None) -> str:
        """Answer a ``presence`` frame: what ``GET /presence`` says, or an ``error`` frame."""
        status, document, _ = await presence_http.answer(self.app, request, identity)
        if status == 200:
            return presence_frame(request.ref, document)
        code = "forbidden" if status == 403 else "rate_limited"
        return error_frame(request.ref, code, document["detail"])

    async def answer_send(
        self, sender: str, send_request: SendRequest, identity: Identity | None = None
    ) -> str:
        """Publish a WebSocket ``send`` and return the ``ack`` or ``error`` frame for it."""
        ref = send_request.ref
        room = send_request.room
        if room is not None and identity is not None and not identity.may_use_room(room):
            return error_frame(ref, "forbidden", f"the token does not allow room {room}")
        try:
            message_id, outcome = await self.app.router.send(sender, send_request)
        except MessageTooLarge as error:
            return error_frame(ref, "too_large", str(error))
        except InvalidInput as error:
            return error_frame(ref, "invalid", str(error))
        except BrokerUnavailable:
            return error_frame(ref, "unavailable", BROKER_UNAVAILABLE)
        if outcome is Outcome.UNROUTED:
            return error_frame(ref, "offline", offline_detail(send_request))
        if outcome is Outcome.FULL:
            return error_frame(ref, "full", FULL_DETAIL)
        return ack_frame(ref, message_id, outcome.value)


def retry_after(seconds: float) -> dict[str, Any]:
    return {
        "kind": "too-many-requests",
        "headers": [(b"retry-after", str(math.ceil(seconds)).encode())],
    }


def offline_detail(request: SendRequest) -> str:
    """Why an unrouted message went nowhere, for a 404 or an ``offline`` error."""
    if request.room is not None:
        return f"room {request.room} has no member connected"
    return f"{request.to} is not connected"


async def echo(receive: Receive, send: Send) -> None:
    """``/_echo`` (``TRIOWS_TEST_ECHO=1`` only): send every frame back, for conformance runs."""
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            continue
        if message["type"] != "websocket.receive":
            return
        text = message.get("text")
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})


class RequestAborted(Exception):
    """The client went away before the whole body arrived."""


class BodyTooSlow(Exception):
    """The whole body did not arrive in time."""


async def read_body(receive: Receive, limit: int, timeout: float) -> bytes | None:
    """The whole request body, or None as soon as it is over ``limit`` bytes.

    Raises :class:`RequestAborted` if the client disconnects before the last
    byte (a cut-off body is not a request: nothing of it is carried out), and
    :class:`BodyTooSlow` if the body is not whole within ``timeout`` seconds.
    """
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise RequestAborted  # http.disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    raise BodyTooSlow(f"the body did not arrive whole within {timeout:g} seconds")


async def refuse(
    scope: Scope,
    send: Send,
    status: int,
    detail: str,
    *,
    kind: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Refuse a WebSocket handshake with an HTTP problem (or a bare close without the extension)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps(problem_document(status, detail, kind=kind)).encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def refuse_cross_origin(scope: Scope, send: Send) -> None:
    """403 for a WebSocket or SSE handshake from a browser page of a disallowed origin."""
    origin = dict(scope["headers"]).get(b"origin", b"").decode("latin-1")
    transport = "websocket" if scope["type"] == "websocket" else "sse"
    log_event("origin_refused", level=logging.WARNING, origin=origin[:200], transport=transport)
    if transport == "websocket":
        await refuse(scope, send, 403, ORIGIN_REFUSED, kind="forbidden-origin")
    else:
        await respond_problem(send, 403, ORIGIN_REFUSED, kind="forbidden-origin")


class _RefusedDeflate(PerMessageDeflate):
    """permessage-deflate that never agrees: the offer is declined in the handshake."""

    def accept(self, offer: str) -> bool | str | None:
        return None


def refuse_permessage_deflate() -> None:
    """Make Hypercorn decline permessage-deflate on every WebSocket of this process.

    Hypercorn offers no setting for it: its handshake builds ``[PerMessageDeflate()]``
    from the module's global on every accept, so that global is replaced. Inflation in
    wsproto is not bounded by any size limit (a compression bomb); our frames are small
    JSON, so compression is not worth a zlib context per socket either.
    """
    from hypercorn.protocol import ws_stream

    vars(ws_stream)["PerMessageDeflate"] = _RefusedDeflate
