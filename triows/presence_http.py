"""``GET /presence?user=U`` and ``?room=R``, and the answer to a WebSocket ``presence`` frame.

Both ask :class:`triows.presence.Presence`; the credentials are those of
``POST /send``, a room's presence is told only to a caller whose token admits
the room, and queries are paced per user (``TRIOWS_PRESENCE_RATE``, bursts of
``TRIOWS_PRESENCE_BURST``), HTTP and WebSocket together.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio

from triows.asgi import (
    Host,
    Receive,
    Refused,
    Scope,
    Send,
    authenticate,
    query_args,
    respond,
    respond_problem,
)
from triows.auth import Identity
from triows.problems import PROBLEM_CONTENT_TYPE, problem_document
from triows.protocol import InvalidInput, PresenceRequest, presence_request

JSON_CONTENT_TYPE = b"application/json"


def rate_detail(app: Host) -> str:
    settings = app.settings
    return (
        f"presence is asked at most {settings.presence_rate:g} times a second per user "
        f"(bursts of {settings.presence_burst})"
    )


async def answer(
    app: Host, request: PresenceRequest, identity: Identity | None
) -> tuple[int, dict[str, Any], float]:
    """(status, document, seconds to wait before asking again: 429 only) for one question."""
    if (
        request.room is not None
        and identity is not None
        and not identity.may_use_room(request.room)
    ):
        detail = f"the token does not allow room {request.room}"
        return 403, problem_document(403, detail, kind="forbidden"), 0.0
    user = identity.user if identity is not None else ""
    wait = app.presence_queries.take(user, 1, trio.current_time())
    if wait:
        return 429, problem_document(429, rate_detail(app), kind="rate-limited"), wait
    presence = app.router.presence
    if request.room is not None:
        result: Any = await presence.room(request.room)
    else:
        assert request.user is not None
        result = await presence.user(request.user)
    app.metrics.presence_queries.labels(str(result.complete).lower()).inc()
    return 200, result.document(), 0.0


async def serve_presence(app: Host, scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /presence``: 200 with the answer, or problem details (400, 401, 403, 405, 429)."""
    settings = app.settings
    if scope["method"] != "GET":
        await respond_problem(send, 405, "use GET", headers=[(b"allow", b"GET")])
        return
    try:
        identity = await authenticate(settings, scope, send)
    except Refused:
        return
    args = query_args(scope)
    try:
        request = presence_request(args.get("user"), args.get("room"))
    except InvalidInput as error:
        await respond_problem(send, 400, str(error), kind="invalid")
        return
    status, document, wait = await answer(app, request, identity)
    if status == 200:
        await respond(send, 200, json.dumps(document).encode(), JSON_CONTENT_TYPE)
        return
    headers = [(b"retry-after", str(math.ceil(wait)).encode())] if wait else []
    await respond(
        send, status, json.dumps(document).encode(), PROBLEM_CONTENT_TYPE.encode(), headers
    )
