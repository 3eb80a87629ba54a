"""The HTTP and WebSocket front of one instance (a ``quart_trio.QuartTrio`` app).

``create_app()`` builds it; Hypercorn's trio worker serves it. The backend is
opened in the app's lifespan by a task in ``app.nursery`` that owns it, the
router and the router's pump. ``POST /send`` and ``/events`` are served by the
lean ASGI handlers of :mod:`triows.dataplane`, in front of the Quart app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Response, send_from_directory
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from triows.backend import open_backend
from triows.dataplane import DataPlane, refuse_permessage_deflate
from triows.logs import configure_logging, log_event
from triows.metrics import Metrics
from triows.problems import problem
from triows.protocol import CLOSE_DRAINING
from triows.router import Router
from triows.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
# Hypercorn's own hard frame limit, above ours so our check answers first with a log line.
HYPERCORN_FRAME_LIMIT_FACTOR = 2


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
        # POST /send and /events are answered in front of Quart (triows.dataplane).
        self.data_plane = DataPlane(self, super().asgi_app)

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
        return self._router is not None and self._router.backend.ready and not self.draining

    async def run_backend(self, *, task_status: trio.TaskStatus[Router]) -> None:
        """Own the backend and the router's pump until the app stops."""
        try:
            async with open_backend(self.settings) as backend:
                router = Router(backend, self.metrics, self.settings)
                self.metrics.broker_ready.set_function(lambda: float(backend.ready))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(router.run)
                    task_status.started(router)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Stop being ready, close every socket with 1012 and wait (bounded) until they are gone."""
        if self.draining:
            return
        self.draining = True
        router = self.router
        log_event("drain_start", connections=len(router.connections))
        for connection in router.connections:
            connection.close(CLOSE_DRAINING, "instance draining, reconnect")
        with trio.move_on_after(self.settings.drain_timeout):
            await router.idle.wait()
        log_event("drain_done", connections_left=len(router.connections))


def create_app(settings: Settings | None = None) -> TriowsApp:
    """Build the app; without ``settings`` they are read from ``TRIOWS_*``."""
    settings = Settings.from_env() if settings is None else settings
    configure_logging(settings.instance_id, settings.log_level)
    app = TriowsApp(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_message_bytes
    refuse_permessage_deflate()

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

    return app
