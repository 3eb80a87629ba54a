"""The ``triows`` command: ``serve`` runs Hypercorn's trio worker, ``token`` mints a JWT.

``serve`` drives Hypercorn itself (rather than ``hypercorn.run``) so that a
SIGTERM first drains the instance — ``/readyz`` 503, sockets closed with 1012,
subscriptions released — before Hypercorn stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from functools import partial
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import repr_socket_addr, wrap_app

from triows.app import FATAL_EXIT_CODE, HYPERCORN_FRAME_LIMIT_FACTOR, create_app
from triows.auth import DEFAULT_TOKEN_TTL, mint_token
from triows.backend import UnknownBackend, check_backend_settings
from triows.logs import log_event, logger
from triows.openfiles import fit_connections_to_open_files
from triows.protocol import InvalidInput
from triows.settings import Settings, SettingsError

# How often a worker process checks whether its parent asked it to stop.
SHUTDOWN_POLL_INTERVAL = 0.1
# TCP keepalive probes left unanswered before the kernel drops a connection.
KEEPALIVE_PROBES = 3


class StartupError(Exception):
    """The server must not start with these settings; the message says why and what to do."""


def check_startup(settings: Settings) -> None:
    """Refuse settings that would be unsafe or could not work, with one clear message."""
    # Imports the backend and lets it check its settings: a malformed broker
    # URL fails here, with one line, not inside the server's lifespan.
    check_backend_settings(settings)
    if settings.dev_mode and not settings.binds_loopback_only and not settings.insecure:
        raise StartupError(
            "refusing to start in dev mode (no TRIOWS_SECRET) on a non-loopback address "
            f"({', '.join(settings.bind)}): anyone could claim any user name. Set "
            "TRIOWS_SECRET, bind to 127.0.0.1, or set TRIOWS_INSECURE=1 if you really mean it"
        )
    if settings.backend == "memory" and settings.workers > 1:
        raise StartupError(
            f"--workers {settings.workers} cannot work with the memory backend: each worker is a "
            "separate instance (process), and the memory backend cannot carry a message from one "
            "process to another, so users on different workers could not reach each other. Use "
            "--workers 1, or a broker backend (e.g. --backend amqp091 with RabbitMQ)"
        )


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = list(settings.bind)
    config.websocket_max_message_size = settings.max_message_bytes * HYPERCORN_FRAME_LIMIT_FACTOR
    config.graceful_timeout = settings.close_timeout
    # No Hypercorn WebSocket pings (websocket_ping_interval): they cost a task per
    # socket and the first goes out at the handshake. Dead peers are found by TCP
    # keepalive instead (see _tune_listener).
    config.accesslog = None
    # Hypercorn's own lines ("Running on ...", errors) become JSON lines too.
    config.errorlog = logger.getChild("hypercorn")
    return config


def write_url_file(path: str, urls: Sequence[str]) -> None:
    """Write the URLs served on, one a line, all at once (a reader never sees half a file)."""
    partial_path = f"{path}.partial"
    with open(partial_path, "w", encoding="utf-8") as file:
        file.write("".join(f"{url}\n" for url in urls))
    os.replace(partial_path, path)


def _socket_urls(sockets: Sockets) -> list[str]:
    """The URLs of bound sockets, as Hypercorn reports them (port 0 resolved)."""
    return [
        f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}"
        for scheme, group in (("https", sockets.secure_sockets), ("http", sockets.insecure_sockets))
        for sock in group
    ]


class WriteDeadlineStream(trio.abc.HalfCloseableStream):
    """A TCP stream whose writes give up after ``timeout`` seconds and reset the connection.

    Hypercorn's trio worker shields every ``send_all`` from cancellation, so no
    timeout in the app can interrupt a write to a peer that never reads. The
    deadline here is inside that shield: it still fires, and the connection is
    reset (SO_LINGER 0), which ends the request or WebSocket as a lost client.
    """

    def __init__(self, stream: trio.SocketStream, timeout: float) -> None:
        self.stream = stream
        self.socket = stream.socket  # Hypercorn reads the addresses from it
        self.timeout = timeout
        self._waiting = False

    def write_now(self, data: bytes | bytearray | memoryview) -> memoryview | None:
        """Write what the socket takes at once (one non-blocking ``write(2)``); return the rest.

        None when all was written. Raises ``BrokenResourceError`` (or
        ``ClosedResourceError``) as ``send_all`` would. Never waits: it is the
        fast path of every write (py-spy put trio's ``send_all`` with its
        deadline at 11 % of a sending instance's CPU, three writes per HTTP
        response), and the caller must hold off other writers until the rest,
        if any, is sent.
        """
        try:
            sent = os.write(self.socket.fileno(), data) if data else 0
        except BlockingIOError:
            sent = 0
        except OSError as error:
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("the connection is closed") from None
            raise trio.BrokenResourceError(f"the write failed: {error!r}") from error
        return None if sent == len(data) else memoryview(data)[sent:]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._waiting:
            # Another write is waiting for the socket: trio reports the conflict.
            await self._send_within_deadline(data)
            return
        rest = self.write_now(data)
        if rest is None:
            return
        self._waiting = True
        try:
            await self._send_within_deadline(rest)
        finally:
            self._waiting = False

    async def _send_within_deadline(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(self.timeout):
            try:
                await self.stream.send_all(data)
            except trio.BusyResourceError:
                # Hypercorn's close (send_eof) raced a write, e.g. its ping task's:
                # the connection is going; uncaught, this would end the whole server.
                raise trio.BrokenResourceError("the connection is closing") from None
            return
        log_event("write_timeout", level=logging.WARNING, bytes=len(data))
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()
        raise trio.BrokenResourceError("the peer took no bytes within the write deadline")

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class KeepAliveTimer:
    """Hypercorn's keep-alive timer (a ``TCPServer``'s ``idle_task``) without a task per request.

    Hypercorn's ``TrioSingleTask`` starts a task (under a lock, through
    ``nursery.start``) each time a connection goes idle and cancels it when
    the next request starts: a task per request. Here one watcher task waits
    while requests come and go, its deadline moved; it ends at its deadline,
    closing the connection if it is idle then (the keep-alive timeout), or
    just ending if a request is still in progress :data:`BUSY_GRACE` after it
    started (a WebSocket keeps no watcher). As in Hypercorn, an idle
    connection also closes when the worker terminates.
    """

    BUSY_GRACE = 1.0
    """How long a watcher outlives the start of a request (which usually ends sooner)."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None  # the running watcher's
        self._idle = False

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection is idle from now (``action``, Hypercorn's timer body, is not used)."""
        self._idle = True
        deadline = trio.current_time() + self._server.config.keep_alive_timeout
        if self._scope is None or self._scope.cancel_called:
            # No watcher, or one whose deadline passed and that has not run yet.
            self._scope = trio.CancelScope(deadline=deadline)
            task_group._nursery.start_soon(self._watch, self._scope)
        else:
            self._scope.deadline = deadline

    async def stop(self) -> None:
        """A request is in progress: the watcher ends if it still is after BUSY_GRACE."""
        self._idle = False
        if self._scope is not None:
            self._scope.deadline = trio.current_time() + self.BUSY_GRACE

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._server.context.terminated.wait()
        if self._scope is not scope:
            return  # a newer watcher took over
        self._scope = None
        if self._idle:
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()


def install_write_deadline(timeout: float) -> None:
    """Give every plain TCP connection Hypercorn's trio worker accepts a write deadline.

    ``worker_serve`` has no hook for the accepted stream, so the ``TCPServer``
    name it calls is replaced by a subclass that wraps the stream first (TLS
    streams are left as they are: terminate TLS in front of triows) and writes
    what the socket takes at once without Hypercorn's lock and shield, and
    times keep-alive with :class:`KeepAliveTimer`. It relies on
    ``TCPServer``'s ``stream``, ``send_lock``, ``protocol``, ``idle_task``,
    ``config``, ``context`` and ``_initiate_server_close`` (hypercorn is pinned
    below 0.19 in pyproject.toml).
    """
    from hypercorn.events import Closed, RawData
    from hypercorn.trio import run as hypercorn_run
    from hypercorn.trio.tcp_server import TCPServer

    class DeadlineTCPServer(TCPServer):
        # A subclass, not a coroutine that wraps the call: no frame of its own per connection.
        def __init__(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
            if isinstance(stream, trio.SocketStream):
                stream = WriteDeadlineStream(stream, timeout)
            super().__init__(app, config, context, state, stream)
            self.idle_task = KeepAliveTimer(self)  # type: ignore[assignment]

        async def protocol_send(self, event: Any) -> None:
            # Hypercorn sends every write under its send lock (a scheduler round
            # trip) inside a shielded cancel scope. A write the socket takes at
            # once needs neither: nothing can come between, as nothing awaits.
            stream = self.stream
            if (
                type(event) is not RawData
                or not isinstance(stream, WriteDeadlineStream)
                or self.send_lock.locked()
            ):
                await super().protocol_send(event)
                return
            try:
                rest = stream.write_now(event.data)
                if rest is None:
                    return
                # Part was written: the rest goes before any other write.
                self.send_lock.acquire_nowait()
                try:
                    with trio.CancelScope(shield=True):
                        await stream.send_all(rest)
                finally:
                    self.send_lock.release()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())

    vars(hypercorn_run)["TCPServer"] = DeadlineTCPServer


def _tune_listener(sock: socket.socket, settings: Settings) -> None:
    """Socket options that accepted connections inherit from their listening socket (Linux).

    TCP keepalive probes a connection idle for ``TRIOWS_PING_INTERVAL`` seconds
    (3 probes, a third of it apart), so a half-open peer is cut within twice the
    interval; TCP_USER_TIMEOUT resets a connection whose sent bytes stay
    unacknowledged (a dead peer, a window that stays shut) for that long too.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not settings.ping_interval:
        return
    idle = max(1, round(settings.ping_interval))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        timeout = max(settings.close_timeout, 2 * settings.ping_interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(1000 * timeout))


def _listening_sockets(config: Config, settings: Settings, *, listen: bool) -> Sockets:
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        _tune_listener(sock, settings)
        if listen:
            sock.listen(config.backlog)
    return sockets


async def _serve_worker(
    settings: Settings,
    config: Config,
    sockets: Sockets | None,
    stop: ProcessEvent | None,
    url_file: str | None = None,
) -> int:
    app = create_app(settings)
    # A dead backend or router stops the server here, and the exit status says so.
    app.exits_on_failure = True
    install_write_deadline(settings.close_timeout)
    if sockets is None:
        sockets = _listening_sockets(config, settings, listen=True)

    async def drain_on_shutdown() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                if stop is not None:
                    nursery.start_soon(_wait_for_process_event, stop, nursery.cancel_scope)
                nursery.start_soon(_cancel_when, app.failed, nursery.cancel_scope)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        if not app.failed.is_set():
            await app.drain()

    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(
            partial(
                worker_serve,
                wrap_app(app, config.wsgi_max_body_size, None),
                config,
                sockets=sockets,
                shutdown_trigger=drain_on_shutdown,
            )
        )
        if url_file is not None:
            write_url_file(url_file, urls)
    return FATAL_EXIT_CODE if app.failed.is_set() else 0


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _wait_for_process_event(event: ProcessEvent, scope: trio.CancelScope) -> None:
    # A multiprocessing event cannot be awaited; Hypercorn polls it the same way.
    while not event.is_set():  # noqa: ASYNC110
        await trio.sleep(SHUTDOWN_POLL_INTERVAL)
    scope.cancel()


def _worker_process(
    settings: Settings, config: Config, sockets: Sockets, stop: ProcessEvent
) -> None:
    # The parent decides when to stop; a Ctrl-C in the terminal reaches it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent only binds the shared sockets; each worker listens on them,
    # as Hypercorn's own trio_worker does (trio.SocketListener insists).
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)
    sys.exit(trio.run(_serve_worker, settings, config, sockets, stop))


def serve(settings: Settings, url_file: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT; with several workers, one process per worker.

    ``url_file``: once listening, write there the URL of each address served
    on (with port 0 in a bind, the port the kernel chose).
    """
    check_startup(settings)
    settings = fit_connections_to_open_files(settings)
    config = hypercorn_config(settings)
    if settings.workers == 1:
        return trio.run(_serve_worker, settings, config, None, None, url_file)
    sockets = _listening_sockets(config, settings, listen=False)
    if url_file is not None:
        write_url_file(url_file, _socket_urls(sockets))
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    processes = []
    for number in range(settings.workers):
        # Each worker is an instance of its own, with its own id and broker queue.
        worker_settings = dataclasses.replace(
            settings, instance_id=f"{settings.instance_id}-w{number}"
        )
        process = context.Process(
            target=_worker_process, args=(worker_settings, config, sockets, stop)
        )
        process.start()
        processes.append(process)

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    running = {process.sentinel: process for process in processes}
    while running:
        for sentinel in multiprocessing.connection.wait(list(running)):
            assert isinstance(sentinel, int)  # process sentinels are file descriptors
            if running.pop(sentinel).exitcode != 0:
                # A worker died: stop the others too, so the orchestrator sees
                # the failure and restarts the whole instance set.
                stop.set()
    return max(abs(process.exitcode or 0) for process in processes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triows", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the server (Hypercorn, trio worker)")
    serve_parser.add_argument(
        "--bind", action="append", help="HOST:PORT to listen on (repeatable; TRIOWS_BIND)"
    )
    serve_parser.add_argument("--workers", type=int, help="worker processes (TRIOWS_WORKERS)")
    serve_parser.add_argument("--backend", help="broker backend (TRIOWS_BACKEND)")
    serve_parser.add_argument("--broker-url", help="broker URL (TRIOWS_BROKER_URL)")
    serve_parser.add_argument(
        "--url-file", help="once listening, write the URL of each bound address to this file"
    )
    token_parser = commands.add_parser("token", help="mint a token from TRIOWS_SECRET")
    token_parser.add_argument("user")
    token_parser.add_argument(
        "--ttl", type=float, default=DEFAULT_TOKEN_TTL, help="seconds until it expires"
    )
    token_parser.add_argument(
        "--room",
        action="append",
        default=[],
        help="a room the token may join and send to; a trailing * allows a prefix (repeatable)",
    )
    commands.add_parser("demo", help="start a server on the memory backend and show Anne and Bob")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``triows`` console script and ``python -m triows``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            bind = tuple(args.bind) if args.bind else None
            settings = Settings.from_env(
                bind=bind, workers=args.workers, backend=args.backend, broker_url=args.broker_url
            )
            return serve(settings, args.url_file)
        if args.command == "token":
            settings = Settings.from_env()
            if not settings.secret:
                raise StartupError("TRIOWS_SECRET is not set: there is no secret to sign with")
            print(mint_token(settings.secret, args.user, args.ttl, tuple(args.room)))
            return 0
        from triows.demo import run_demo

        return trio.run(run_demo)
    except (SettingsError, StartupError, UnknownBackend, InvalidInput) as error:
        print(f"triows: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
