"""What the data plane (:mod:`triows.dataplane`) and the event stream (:mod:`triows.sse`) share.

The ASGI callable types, plain answers with problem details, the request's
credentials and query arguments, and, as protocols, what the handlers use of
the app (:class:`Host`) and of the data plane (:class:`Plane`). So the
imports run one way: the app imports the data plane, the data plane the event
stream, and both of those this module; none of them imports back up.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from triows.auth import AuthError, identify
from triows.logs import log_event
from triows.problems import PROBLEM_CONTENT_TYPE, problem_document

if TYPE_CHECKING:
    import trio

    from triows.auth import Identity
    from triows.connection import Connection
    from triows.metrics import Metrics
    from triows.rate import RatePerUser
    from triows.router import Router
    from triows.session import Resume, SessionLink
    from triows.settings import Settings

Scope = MutableMapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]


class Host(Protocol):
    """What the handlers use of the app (:class:`triows.app.TriowsApp`)."""

    settings: Settings
    metrics: Metrics
    draining: bool
    # Where each connection's writer task runs.
    nursery: trio.Nursery
    # Event streams' ?room= joins, paced per user.
    stream_joins: RatePerUser
    # Sessions opened or resumed (each is a queue at the broker), paced per user.
    session_opens: RatePerUser
    # Presence queries (HTTP and WebSocket), paced per user.
    presence_queries: RatePerUser

    @property
    def router(self) -> Router: ...


class Plane(Protocol):
    """What the event stream uses of the data plane (:class:`triows.dataplane.DataPlane`)."""

    app: Host
    settings: Settings
    # WebSocket and SSE slots taken; the handler that took one gives it back.
    slots_taken: int

    def reserve_slot(self, transport: str) -> bool: ...

    def full_detail(self) -> str: ...

    def full_refusal(self) -> dict[str, Any]: ...

    def session_wait(self, user: str) -> float: ...

    def session_rate_detail(self) -> str: ...

    async def open_link(
        self, connection: Connection, resume: Resume | None, identity: Identity
    ) -> SessionLink | None: ...


def query_args(scope: Scope) -> dict[str, str]:
    """The query string's arguments, the first value of each name."""
    args: dict[str, str] = {}
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        args.setdefault(name, value)
    return args


def auth_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
    """The one header :func:`triows.auth.identify` reads, under the name it looks up."""
    value = headers.get(b"authorization")
    return {} if value is None else {"Authorization": value.decode("latin-1")}


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_problem(
    send: Send,
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> None:
    """Answer with problem details; ``close`` ends the connection (the body was not all read)."""
    extra = [*(headers or []), *([(b"connection", b"close")] if close else [])]
    body = json.dumps(problem_document(status, detail, kind=kind)).encode()
    await respond(send, status, body, PROBLEM_CONTENT_TYPE.encode(), extra)


class Refused(Exception):
    """The request was answered with an error already (by :func:`authenticate`)."""


async def authenticate(
    settings: Settings, scope: Scope, send: Send, *, close: bool = False
) -> Identity | None:
    """The caller of an HTTP request (``POST /send``, ``GET /presence``); None in dev mode.

    Bad or missing credentials are answered 401 (``close``: and the
    connection closed, when the body is not read) and raise :class:`Refused`.
    """
    if settings.dev_mode:
        return None
    try:
        return identify(
            settings.secret,
            auth_headers(dict(scope["headers"])),
            query_args(scope),
            dev_user=None,
            leeway=settings.jwt_leeway,
        )
    except AuthError as error:
        log_event("auth_failed", path=scope.get("path"), reason=str(error))
        await respond_problem(
            send,
            401,
            str(error),
            kind="unauthorized",
            headers=[(b"www-authenticate", b"Bearer")],
            close=close,
        )
        raise Refused from None
