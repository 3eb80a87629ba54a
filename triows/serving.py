"""How ``triows serve`` runs Hypercorn's trio worker: every reliance on Hypercorn internals.

Hypercorn has no hook for the accepted stream, its timers or its protocol
choice, so ``triows serve`` adapts its trio worker here, and only here; each
piece says why and what it gained. Everything this module relies on inside
Hypercorn is checked by ``tests/test_hypercorn_internals.py``, which names the
attribute when a release moves it (hypercorn is pinned below 0.19 in
pyproject.toml until that test passes on a newer one).

- :class:`WriteDeadlineStream`: a write that never completes resets the connection.
- :class:`DeadlineTCPServer`: Hypercorn's ``TCPServer`` with that stream, its
  send lock taken only when a write must wait, and :class:`KeepAliveTimer`.
- :class:`HTTP11OnlyProtocol`: HTTP/1.1 only; HTTP/2 is refused, and request
  heads a proxy could read differently are refused before h11 reads them.
- :func:`serve`: one worker process per ``TRIOWS_WORKERS``, drained on SIGTERM or SIGINT
  (once: a repeated signal does not cut the drain short; SIGKILL does).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import h11
import trio
from h2.errors import ErrorCodes
from hypercorn.config import Config, Sockets
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, WSStream
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import tcp_server
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import repr_socket_addr, wrap_app
from hyperframe.frame import GoAwayFrame, SettingsFrame
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

from triows.app import FATAL_EXIT_CODE, HYPERCORN_FRAME_LIMIT_FACTOR, create_app
from triows.logs import log_event, logger
from triows.openfiles import fit_connections_to_open_files
from triows.settings import Settings

# What asks ``triows serve`` to drain and stop; repeated during a drain, each is ignored.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How often a worker process checks whether its parent asked it to stop.
SHUTDOWN_POLL_INTERVAL = 0.1
# TCP keepalive probes left unanswered before the kernel drops a connection.
KEEPALIVE_PROBES = 3
# What an HTTP/2 client that opens with the connection preface gets: the server's
# preface (an empty SETTINGS frame), then GOAWAY with HTTP_1_1_REQUIRED (RFC 9113 §7).
HTTP2_REFUSAL = (
    SettingsFrame(0).serialize()
    + GoAwayFrame(0, error_code=ErrorCodes.HTTP_1_1_REQUIRED).serialize()
)


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn's settings for ``triows serve`` (public ``Config`` attributes only)."""
    config = Config()
    config.bind = list(settings.bind)
    config.websocket_max_message_size = settings.max_message_bytes * HYPERCORN_FRAME_LIMIT_FACTOR
    config.graceful_timeout = settings.close_timeout
    # No Hypercorn WebSocket pings (websocket_ping_interval): they cost a task per
    # socket and the first goes out at the handshake. Dead peers are found by TCP
    # keepalive instead (see _tune_listener).
    config.accesslog = None
    # HTTP/1.1 only (see HTTP11OnlyProtocol): TLS offers nothing else by ALPN.
    config.alpn_protocols = ["http/1.1"]
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
    reset (SO_LINGER 0), which ends the request or WebSocket as a lost client:
    a peer that never reads holds its connection for ``TRIOWS_CLOSE_TIMEOUT``
    at most, not for good.
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
    connection also closes when the worker terminates. It took one message
    (memory backend, ``POST /send`` and its WebSocket delivery, callgrind)
    from 2.47 M to 1.99 M instructions.

    Relies on ``TCPServer.idle_task``'s ``restart(task_group, action)`` and
    ``stop()``, Hypercorn's trio ``TaskGroup._nursery``, and the server's
    ``config.keep_alive_timeout``, ``context.terminated`` and
    ``_initiate_server_close``.
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


class DeadlineTCPServer(TCPServer):
    """Hypercorn's per-connection ``TCPServer``, with a write deadline and a leaner write path.

    Installed by :func:`install_hypercorn_adaptation` in place of the name
    ``worker_serve`` calls (it has no hook for the accepted stream). A plain
    TCP stream is wrapped in :class:`WriteDeadlineStream` (TLS streams are left
    as they are: terminate TLS in front of triows); a write the socket takes at
    once goes out without Hypercorn's send lock and shield; keep-alive is timed
    by :class:`KeepAliveTimer`. The write fast path and the lock taken only
    when a write must wait took one message (memory backend, ``POST /send``
    and its WebSocket delivery, callgrind) from 3.31 M to 2.47 M instructions.

    Relies on ``TCPServer``'s ``__init__`` signature and its ``stream``,
    ``send_lock``, ``protocol``, ``idle_task``, ``protocol_send``, ``config``,
    ``context`` and ``_initiate_server_close``.
    """

    write_timeout: float = 5.0
    """Seconds a write may wait for the peer (``TRIOWS_CLOSE_TIMEOUT``, set at install)."""

    # A subclass, not a coroutine that wraps the call: no frame of its own per connection.
    def __init__(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
        if isinstance(stream, trio.SocketStream):
            stream = WriteDeadlineStream(stream, self.write_timeout)
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


def request_head_problem(received: bytes) -> str | None:
    """Why the request head ``received`` starts with must be refused; None if it need not be.

    ``received`` is what a connection holds when a request head is due; the
    head may be incomplete (then only what is there is checked). h11 accepts
    each of these, but a proxy in front may read them otherwise, so one
    request could be read as two (request smuggling); RFC 9112 allows or
    asks to refuse them: a line ending in a bare LF (§2.2), a header line
    continued on the next (obs-fold, §5.2), both Content-Length and
    Transfer-Encoding (§6.1).
    """
    while received.startswith(b"\r\n"):
        received = received[2:]  # empty lines before a request line are ignored (§2.2)
    end = received.find(b"\r\n\r\n")
    complete = end >= 0
    head = received[:end] if complete else received
    if head.count(b"\n") != head.count(b"\r\n"):
        return "a line ends in a bare LF: end every line with CRLF"
    if b"\r\n " in head or b"\r\n\t" in head:
        return "a header line is continued on the next (obs-fold): send it on one line"
    if complete:
        lowered = head.lower()
        # The substrings first: the names are split out only when both may be there.
        if b"transfer-encoding" in lowered and b"content-length" in lowered:
            names = {line.partition(b":")[0].strip() for line in lowered.split(b"\r\n")}
            if b"content-length" in names and b"transfer-encoding" in names:
                return "both Content-Length and Transfer-Encoding: send one of them"
    return None


class CheckedH11Connection(h11.Connection):
    """h11's server connection that refuses a doubtful request head and ignores ``Upgrade: h2c``.

    A head :func:`request_head_problem` refuses raises ``RemoteProtocolError``,
    which Hypercorn answers with 400 and ``Connection: close``. A request
    asking to upgrade to cleartext HTTP/2 is served as HTTP/1.1 without its
    ``Upgrade`` header (a server may ignore an upgrade), as Hypercorn would
    switch before the app sees it.
    """

    def next_event(self) -> Any:
        if self.their_state is not h11.IDLE:
            return super().next_event()
        received = self.trailing_data[0]
        problem = request_head_problem(received)
        if problem is not None:
            log_event("request_refused", level=logging.WARNING, reason=problem)
            raise h11.RemoteProtocolError(problem, error_status_hint=400)
        event = super().next_event()
        if type(event) is h11.Request and b"h2c" in received.lower() and _asks_for_h2c(event):
            headers = [
                (name, value)
                for name, value in event.headers
                if name not in (b"upgrade", b"http2-settings")
            ]
            return h11.Request(
                method=event.method,
                target=event.target,
                headers=headers,
                http_version=event.http_version,
            )
        return event


def _asks_for_h2c(request: h11.Request) -> bool:
    return any(
        name == b"upgrade" and value.strip().lower() == b"h2c" for name, value in request.headers
    )


class HTTP11OnlyProtocol(ProtocolWrapper):
    """Hypercorn's per-connection protocol choice, always HTTP/1.1.

    Hypercorn switches a connection to HTTP/2 when it opens with the HTTP/2
    preface (prior knowledge), asks for ``Upgrade: h2c``, or (TLS) picks h2
    by ALPN, and nothing turns that off. Its HTTP/2 has none of the bounds
    triows keeps over HTTP/1.1: a stream whose client went away kept its
    task, socket and memory for good, and an event stream ignored the
    slow-consumer bound at a zero flow-control window. Measured with
    ``python -m bench.abuse_http`` before this refusal: 50 half-sent
    ``POST /send`` bodies left 50 file descriptors open for good (12 → 62);
    two connections of 100 streams of 1 MiB a round took the RSS from 49 to
    401, 632 and 858 MB over three rounds. With it: no descriptor and no
    memory kept (11 → 11 fds, 49 → 49 MB after either attack). triows serves
    HTTP/1.1 (WebSockets and Server-Sent Events included); a proxy in front
    may speak HTTP/2 to browsers. A connection opening with the preface gets
    :data:`HTTP2_REFUSAL` and is closed; an h2c upgrade is ignored (see
    :class:`CheckedH11Connection`); TLS offers only http/1.1 (``hypercorn_config``).

    Installed by :func:`install_hypercorn_adaptation` in place of the name
    ``TCPServer.run`` builds. Relies on ``ProtocolWrapper``'s ``__init__``
    signature, its ``protocol`` and ``send``, ``H11Protocol.connection``,
    and ``H2ProtocolAssumedError`` (raised for the preface).
    """

    def __init__(
        self,
        app: Any,
        config: Config,
        context: Any,
        task_group: Any,
        state: Any,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Any,
        alpn_protocol: str | None = None,
    ) -> None:
        # alpn_protocol is dropped: never H2Protocol, whatever TLS negotiated.
        super().__init__(app, config, context, task_group, state, ssl, client, server, send)
        assert isinstance(self.protocol, H11Protocol)
        self.protocol.connection = CheckedH11Connection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except (H2ProtocolAssumedError, H2CProtocolRequiredError):
            log_event("http2_refused", level=logging.WARNING)
            await self.send(RawData(data=HTTP2_REFUSAL))
            await self.send(Closed())


class ClientCloseWSStream(WSStream):
    """Hypercorn's WebSocket stream, telling the app the code the *client* closed with.

    Hypercorn reports every close the client starts as 1006 (it reports 1000
    only when the app closed first), so the app cannot tell a client that is
    done (1000: its session ends at once) from one whose network went (its
    session waits for a resume). This records the code of the client's close
    frame and hands it over in ``websocket.disconnect``. ``_handle_events`` is
    Hypercorn's own (0.17), with that one line added.
    """

    client_close_code: int | None = None

    async def handle(self, event: StreamEvent) -> None:
        code = self.client_close_code
        if isinstance(event, StreamClosed) and code is not None and self.app_put is not None:
            if not self.closed:
                self.closed = True
                await self.app_put({"type": "websocket.disconnect", "code": code})
            return
        await super().handle(event)

    async def _handle_events(self) -> None:
        put = self.app_put
        assert put is not None  # the app runs once the handshake is accepted
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    break
                if event.message_finished:
                    await put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                self.client_close_code = event.code  # the added line
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(StreamClosed(stream_id=self.stream_id))


def install_hypercorn_adaptation(settings: Settings) -> None:
    """Adapt Hypercorn's trio worker in this process.

    Replaces the ``TCPServer`` name in ``hypercorn.trio.run`` (see
    :class:`DeadlineTCPServer`; writes give up after ``TRIOWS_CLOSE_TIMEOUT``
    seconds), the ``ProtocolWrapper`` name in ``hypercorn.trio.tcp_server``
    (see :class:`HTTP11OnlyProtocol`) and the ``WSStream`` name in
    ``hypercorn.protocol.h11`` (see :class:`ClientCloseWSStream`).
    """
    DeadlineTCPServer.write_timeout = settings.close_timeout
    vars(hypercorn_run)["TCPServer"] = DeadlineTCPServer
    vars(tcp_server)["ProtocolWrapper"] = HTTP11OnlyProtocol
    vars(hypercorn_h11)["WSStream"] = ClientCloseWSStream


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
    install_hypercorn_adaptation(settings)
    if sockets is None:
        sockets = _listening_sockets(config, settings, listen=True)

    stop_requested = trio.Event()

    async def drain_on_shutdown() -> None:
        async with trio.open_nursery() as nursery:
            if stop is not None:
                nursery.start_soon(_wait_for_process_event, stop, nursery.cancel_scope)
            nursery.start_soon(_cancel_when, app.failed, nursery.cancel_scope)
            nursery.start_soon(_cancel_when, stop_requested, nursery.cancel_scope)
        if not app.failed.is_set():
            await app.drain()

    # Held until Hypercorn has stopped, not only until the drain starts: a
    # signal that arrived after the receiver closed would get the default
    # action (KeyboardInterrupt, or death by SIGTERM) and cut the drain short.
    # Ignored just before it opens (no checkpoint in between), so that the
    # receiver puts "ignored" back when it closes: a signal during the last
    # steps of the exit cannot turn a clean exit into death by signal either.
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as watching:
            watching.start_soon(_request_stop_on_signals, signals, stop_requested)
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
            watching.cancel_scope.cancel()
    return FATAL_EXIT_CODE if app.failed.is_set() else 0


async def _request_stop_on_signals(signals: AsyncIterator[int], stop_requested: trio.Event) -> None:
    """The first SIGTERM or SIGINT starts the drain; later ones are logged and ignored.

    A terminal's Ctrl-C and a supervisor's SIGTERM often come together (or a
    second Ctrl-C follows an impatient first): none of them may cut the drain
    short, which is bounded by ``TRIOWS_DRAIN_TIMEOUT`` anyway. Only SIGKILL
    stops the process at once.
    """
    async for number in signals:
        name = signal.Signals(number).name
        if stop_requested.is_set():
            log_event(
                "stop_signal_ignored", signal=name, detail="already stopping; SIGKILL stops now"
            )
        else:
            log_event("stop_signal", signal=name)
            stop_requested.set()


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
    The caller checks the settings first (``triows.cli.check_startup``).
    """
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
