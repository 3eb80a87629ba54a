"""The HTTP and WebSocket front of one instance (a ``quart_trio.QuartTrio`` app).

``create_app()`` builds it; Hypercorn's trio worker serves it. The backend is
opened in the app's lifespan by a task in ``app.nursery`` that owns it, the
router and the router's pump. ``POST /send`` and ``/events`` are served by the
lean ASGI handlers of :mod:`triows.dataplane`, in front of the Quart app.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, send_from_directory
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from triows.asgi import respond_problem
from triows.backend import open_backend
from triows.dataplane import DataPlane, refuse, refuse_permessage_deflate
from triows.logs import configure_logging, log_event
from triows.metrics import Metrics
from triows.problems import problem
from triows.protocol import CLOSE_DRAINING
from triows.rate import RatePerUser
from triows.router import Router
from triows.settings import Settings
from triows.websecurity import host_allowed, page_headers, static_file_headers

STATIC_DIR = Path(__file__).parent / "static"
# The browser client module (served at /triows.js) and the pages' icon.
CLIENT_MODULE = "triows.js"
FAVICON = "favicon.svg"
# Hypercorn's own hard frame limit, above ours so our check answers first with a log line.
HYPERCORN_FRAME_LIMIT_FACTOR = 2
# The exit status of an instance whose backend or router died (EX_SOFTWARE).
FATAL_EXIT_CODE = 70


class TriowsApp(QuartTrio):
    """A QuartTrio app that also knows its settings, router and drain state."""

    def __init__(self, settings: Settings) -> None:
        # No static route: the page, its module and its icon are served by name,
        # with their security headers.
        super().__init__("triows", static_folder=None)
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
        # With a secret, a rebinding page has no token to use: the Host is
        # checked there only when the operator names the hosts.
        self.checks_host = self.guards_dev_mode or bool(settings.allowed_hosts)
        # Rooms asked for by event streams' ``?room=``, per user (triows.rate).
        self.stream_joins = RatePerUser(settings.send_rate, settings.send_burst)
        self.session_opens = RatePerUser(settings.send_rate, settings.send_burst)
        # Presence queries, HTTP and WebSocket together, per user.
        self.presence_queries = RatePerUser(settings.presence_rate, settings.presence_burst)
        # POST /send and /events are answered in front of Quart (triows.dataplane).
        self.data_plane = DataPlane(self, super().asgi_app)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Serve one ASGI connection; in dev mode only those that came in on loopback.

        The bind addresses are known to ``triows serve`` but not to the app
        under another server (``hypercorn 'triows.app:create_app()'``), so
        dev mode is enforced here, per connection, on the local address the
        server reports: a request that arrived on a non-loopback address or a
        unix socket is refused with 403 (a WebSocket handshake too), unless
        ``TRIOWS_INSECURE=1``. A request whose ``Host`` is not a loopback name
        or one of ``TRIOWS_ALLOWED_HOSTS`` (DNS rebinding) is refused with 403
        too, in dev mode and whenever that setting is set.
        """
        if scope["type"] != "lifespan":
            if self.guards_dev_mode and not _on_loopback(scope):
                await _refuse_dev_mode(scope, send)
                return
            if self.checks_host and not host_allowed(scope["headers"], self.settings.allowed_hosts):
                await _refuse_host(scope, send)
                return
        await super().__call__(scope, receive, send)

    async def asgi_app(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await self.data_plane(cast(Any, scope), cast(Any, receive), cast(Any, send))

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
                    await nursery.start(router.presence.run)
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
        """Drain in the order docs/operations.md gives, all within ``TRIOWS_DRAIN_TIMEOUT``.

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


HOST_REFUSED = (
    "this server does not answer to that Host name (a DNS-rebinding page would send it): "
    "use a loopback address or localhost, or list the name in TRIOWS_ALLOWED_HOSTS"
)


async def _refuse_host(scope: Mapping[str, Any], send: ASGISendCallable) -> None:
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    log_event("host_refused", level=logging.WARNING, host=host[:200], path=scope.get("path"))
    plane_send = cast(Any, send)
    if scope["type"] == "websocket":
        await refuse(dict(scope), plane_send, 403, HOST_REFUSED, kind="forbidden-host")
    else:
        await respond_problem(plane_send, 403, HOST_REFUSED, kind="forbidden-host")


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
    refuse_permessage_deflate()
    chat_page_headers = page_headers((STATIC_DIR / "chat.html").read_text(encoding="utf-8"))

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
        response = await send_from_directory(STATIC_DIR, "chat.html")
        response.headers.update(chat_page_headers)
        return response

    @app.get("/triows.js")
    async def client_module() -> Response:
        response = await send_from_directory(
            STATIC_DIR, CLIENT_MODULE, mimetype="text/javascript; charset=utf-8"
        )
        response.headers.update(static_file_headers())
        return response

    # Browsers ask for /favicon.ico on every page that names no icon.
    @app.get("/favicon.ico")
    @app.get("/favicon.svg")
    async def favicon() -> Response:
        response = await send_from_directory(STATIC_DIR, FAVICON, mimetype="image/svg+xml")
        response.headers.update(static_file_headers())
        return response

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

    return app
