"""The HTTP and WebSocket front of one instance (a ``quart_trio.QuartTrio`` app).

``create_app()`` builds it; Hypercorn's trio worker serves it. The backend is
opened in the app's lifespan by a task in ``app.nursery`` that owns it, the
router and the router's pump; each WebSocket runs a reader and a writer in a
nursery of its own.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, request, send_from_directory, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from triows import auth
from triows.auth import AuthError, Identity
from triows.backend import BrokerUnavailable, Outcome, open_backend
from triows.connection import Connection, run_expiry
from triows.logs import configure_logging, log_event
from triows.metrics import Metrics
from triows.problems import problem
from triows.protocol import (
    CLOSE_DRAINING,
    CLOSE_INVALID_FRAME,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_LARGE,
    InvalidInput,
    InvalidSendFrame,
    MessageTooLarge,
    ProtocolViolation,
    SendRequest,
    ack_frame,
    error_frame,
    hello_frame,
    parse_client_frame,
    parse_send_body,
)
from triows.router import Router
from triows.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
# Hypercorn's own hard frame limit, above ours so our check answers first with a log line.
HYPERCORN_FRAME_LIMIT_FACTOR = 2
# The exit status of an instance whose backend or router died (EX_SOFTWARE).
FATAL_EXIT_CODE = 70


class TriowsApp(QuartTrio):
    """A QuartTrio app that also knows its settings, router and drain state."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("triows")
        self.settings = settings
        self.metrics = Metrics()
        self.draining = False
        self._router: Router | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        # Set when the backend or the router's pump died (see fail()).
        self.failed = trio.Event()
        self.fatal_error = ""
        # True when the server serving this app stops on ``failed`` and exits
        # non-zero itself (``triows serve``); else fail() ends the process.
        self.exits_on_failure = False
        self.guards_dev_mode = settings.dev_mode and not settings.insecure

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI connection; in dev mode only those that came in on loopback.

        The bind addresses are known to ``triows serve`` but not to the app
        under another server (``hypercorn 'triows.app:create_app()'``), so
        dev mode is enforced here, per connection, on the local address the
        server reports: a request that arrived on a non-loopback address or a
        unix socket is refused with 403 (a WebSocket handshake too), unless
        ``TRIOWS_INSECURE=1``.
        """
        if self.guards_dev_mode and scope["type"] != "lifespan" and not _on_loopback(scope):
            await _refuse_dev_mode(scope, send)
            return
        await super().__call__(scope, receive, send)

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("the app is not serving: its lifespan has not started")
        return self._router

    @property
    def ready(self) -> bool:
        return (
            self._router is not None
            and self._router.backend.ready
            and not self.draining
            and not self.failed.is_set()
        )

    async def run_backend(self, *, task_status: trio.TaskStatus[Router]) -> None:
        """Own the backend and the router's pump until the app stops.

        If the backend's tasks or the router's pump die (or the pump ends)
        before the app stops, the instance cannot route any more: that is
        :meth:`fail`, which ends the process with a non-zero exit.
        """
        started = False
        try:
            async with open_backend(self.settings) as backend:
                router = Router(backend, self.metrics, self.settings)
                self.metrics.broker_ready.set_function(lambda: float(backend.ready))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, router)
                    task_status.started(router)
                    started = True
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
        except BaseException as error:
            if not started or self._stop.is_set() or _is_cancellation(error):
                raise
            self.fail(error)
        finally:
            self._stopped.set()

    def fail(self, error: BaseException) -> None:
        """The instance cannot route any more: log ``fatal`` and end the process, non-zero.

        Under ``triows serve`` the server waits on :attr:`failed` and stops
        (closing every socket) and the process exits with
        :data:`FATAL_EXIT_CODE`. Under a server that does not (plain
        Hypercorn), the process exits at once with that code rather than live
        on unable to route: the orchestrator restarts it.
        """
        self.fatal_error = f"{error.__class__.__name__}: {error}"
        log_event("fatal", level=logging.CRITICAL, error=self.fatal_error)
        self.failed.set()
        if not self.exits_on_failure:
            os._exit(FATAL_EXIT_CODE)

    async def drain(self) -> None:
        """Drain in the order DESIGN §6.4 gives, all of it within ``TRIOWS_DRAIN_TIMEOUT``.

        ``/readyz`` turns 503; every held key is unsubscribed (the broker
        stops routing here: a user connected only here is offline, 404); what
        the broker had already delivered is flushed to the sockets; then the
        sockets close with 1012. The broker connection closes after, when
        the app stops.
        """
        if self.draining:
            return
        self.draining = True
        router = self.router
        log_event("drain_start", connections=len(router.connections))
        # One deadline for the whole drain, whatever the broker and the clients do.
        deadline = trio.current_time() + self.settings.drain_timeout
        with trio.move_on_at(deadline):
            await router.release_all(self.settings.drain_timeout)
        for connection in router.connections:
            connection.close(CLOSE_DRAINING, "instance draining, reconnect")
        with trio.move_on_at(deadline):
            await router.idle.wait()
        log_event("drain_done", connections_left=len(router.connections))


DEV_MODE_REFUSED = (
    "dev mode (no TRIOWS_SECRET) serves loopback only: this connection came in on "
    "another address. Set TRIOWS_SECRET, or TRIOWS_INSECURE=1 if you really mean it"
)


@functools.lru_cache(maxsize=64)
def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _on_loopback(scope: Mapping[str, Any]) -> bool:
    """Whether the connection came in on a loopback address, as far as the server says.

    Hypercorn (and uvicorn) always report ``server``; it is None for a unix
    socket, which anyone who can open the file could use: refused. No
    ``server`` key at all means no network is involved (an in-process caller
    such as Quart's test client).
    """
    if "server" not in scope:
        return True
    server = scope["server"]
    if not isinstance(server, tuple | list) or len(server) != 2 or server[1] is None:
        return False
    return _is_loopback_ip(str(server[0]))


async def _refuse_dev_mode(scope: Scope, send: ASGISendCallable) -> None:
    log_event("dev_mode_refused", level=logging.WARNING, server=str(scope.get("server")))
    body = json.dumps({"title": "Forbidden", "status": 403, "detail": DEV_MODE_REFUSED}).encode()
    if scope["type"] == "websocket":
        # Closing before accepting is answered with HTTP 403 by the server.
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _pump(router: Router) -> None:
    await router.run()
    raise RuntimeError("the backend's stream of incoming messages ended")


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return isinstance(error, trio.Cancelled | KeyboardInterrupt | SystemExit)


def create_app(settings: Settings | None = None) -> TriowsApp:
    """Build the app; without ``settings`` they are read from ``TRIOWS_*``."""
    settings = Settings.from_env() if settings is None else settings
    configure_logging(settings.instance_id, settings.log_level)
    app = TriowsApp(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_bytes
    # The handlers below authenticate with this instance's clock-skew leeway.
    identify = functools.partial(auth.identify, leeway=settings.jwt_leeway)

    @app.before_serving
    async def start_backend() -> None:
        app._router = await app.nursery.start(app.run_backend)
        log_event("start", backend=settings.backend, dev_mode=settings.dev_mode)

    @app.after_serving
    async def stop_backend() -> None:
        app._stop.set()
        await app._stopped.wait()
        log_event("stop")

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        return problem(status, error.description or "")

    @app.get("/")
    async def chat_page() -> Response:
        return await send_from_directory(STATIC_DIR, "chat.html")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "instance": settings.instance_id}

    @app.get("/readyz")
    async def readyz() -> Response | dict[str, str]:
        if app.draining:
            return problem(503, "this instance is draining", kind="draining")
        if not app.ready:
            return problem(503, "the broker is not connected", kind="broker-unavailable")
        return {"status": "ready", "instance": settings.instance_id}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.post("/send")
    async def send() -> Response | tuple[dict[str, Any], int]:
        if request.mimetype != "application/json":
            return problem(415, "send a JSON body with Content-Type: application/json")
        identity: Identity | None = None
        if not settings.dev_mode:
            try:
                identity = identify(
                    settings.secret, dict(request.headers), request.args, dev_user=None
                )
            except AuthError as error:
                log_event("auth_failed", path="/send", reason=str(error))
                return problem(
                    401, str(error), kind="unauthorized", headers={"WWW-Authenticate": "Bearer"}
                )
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)  # as_text=False
        try:
            send_request, dev_sender = parse_send_body(raw, dev_mode=settings.dev_mode)
            sender = identity.user if identity is not None else dev_sender
            message_id, outcome = await app.router.send(sender, send_request)
        except MessageTooLarge as error:
            return problem(413, str(error), kind="too-large")
        except InvalidInput as error:
            return problem(400, str(error), kind="invalid")
        except BrokerUnavailable as error:
            return problem(
                503,
                f"the broker is unavailable: {error}",
                kind="broker-unavailable",
                headers={"Retry-After": str(settings.retry_after)},
            )
        if outcome is Outcome.UNROUTED:
            return problem(404, f"{send_request.to} is not connected", kind="offline")
        return {"id": message_id, "status": outcome.value}, 202

    @app.websocket("/events")
    async def events() -> Response | None:
        try:
            identity = identify(
                settings.secret,
                dict(websocket.headers),
                websocket.args,
                dev_user=websocket.args.get("user"),
            )
        except InvalidInput as error:
            return problem(400, str(error), kind="invalid")
        except AuthError as error:
            log_event("auth_failed", path="/events", reason=str(error))
            return problem(401, str(error), kind="unauthorized")
        if app.draining:
            return problem(503, "this instance is draining", kind="draining")
        if len(app.router.connections) >= settings.max_connections:
            log_event("connection_refused", level=logging.WARNING, reason="max_connections")
            return problem(
                503,
                f"this instance holds its maximum of {settings.max_connections} connections",
                kind="too-many-connections",
                headers={"Retry-After": str(settings.retry_after)},
            )
        await websocket.accept()
        await serve_connection(app, identity)
        return None

    return app


async def serve_connection(app: TriowsApp, identity: Identity) -> None:
    """Run one accepted WebSocket until it closes, whoever closes it."""
    settings = app.settings
    connection = Connection(identity.user, settings.send_queue)
    connection.offer(hello_frame(identity.user, settings.instance_id))
    try:
        async with app.router.attached(connection):
            log_event("connect", user=identity.user, connection=connection.id)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.run_writer, websocket.send)
                nursery.start_soon(read_frames, app, connection)
                nursery.start_soon(run_expiry, connection, identity.expires_at, CLOSE_TOKEN_EXPIRED)
                await connection.closing.wait()
                with trio.move_on_after(settings.close_timeout):
                    await connection.writer_done.wait()
                nursery.cancel_scope.cancel()
            if connection.writer_done.is_set():
                with trio.move_on_after(settings.close_timeout):
                    await websocket.close(connection.close_code or 1000, connection.close_reason)
    finally:
        log_event(
            "disconnect",
            user=identity.user,
            connection=connection.id,
            code=connection.close_code or "client",
            reason=connection.close_reason,
        )


async def read_frames(app: TriowsApp, connection: Connection) -> None:
    """Read the client's frames and answer each ``send`` with an ``ack`` or ``error``."""
    limit = app.settings.max_message_bytes
    while True:
        data = await websocket.receive()
        if isinstance(data, bytes):
            connection.close(CLOSE_INVALID_FRAME, "binary frames are not part of the protocol")
            return
        # A character is at most 4 bytes in UTF-8: encode only a frame that could be over.
        if len(data) > limit or (len(data) * 4 > limit and len(data.encode()) > limit):
            log_event("frame_too_large", level=logging.WARNING, user=connection.user)
            connection.close(CLOSE_TOO_LARGE, f"frames are limited to {limit} bytes")
            return
        try:
            send_request = parse_client_frame(data)
        except ProtocolViolation as error:
            log_event(
                "invalid_frame", level=logging.WARNING, user=connection.user, reason=str(error)
            )
            connection.close(CLOSE_INVALID_FRAME, str(error))
            return
        except InvalidSendFrame as error:
            connection.offer(error_frame(error.ref, "invalid", str(error)))
            continue
        connection.offer(await answer_send(app, connection.user, send_request))


async def answer_send(app: TriowsApp, sender: str, send_request: SendRequest) -> str:
    """Publish a WebSocket ``send`` and return the ``ack`` or ``error`` frame for it."""
    ref = send_request.ref
    try:
        message_id, outcome = await app.router.send(sender, send_request)
    except MessageTooLarge as error:
        return error_frame(ref, "too_large", str(error))
    except BrokerUnavailable as error:
        return error_frame(ref, "unavailable", f"the broker is unavailable: {error}")
    if outcome is Outcome.UNROUTED:
        return error_frame(ref, "offline", f"{send_request.to} is not connected")
    return ack_frame(ref, message_id, outcome.value)
