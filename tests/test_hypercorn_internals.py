"""What triows relies on inside Hypercorn, one test per thing, each naming it when it moves.

``triows/serving.py`` adapts Hypercorn's trio worker through names and
attributes Hypercorn does not document (and ``triows.dataplane`` declines
permessage-deflate through one). hypercorn is pinned below 0.19 in
pyproject.toml; to lift the pin, install the new release and run this module:
each failure says what moved and what triows uses it for.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper, ws_stream
from hypercorn.protocol.h11 import H2CProtocolRequiredError, H2ProtocolAssumedError, H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio import tcp_server
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.utils import repr_socket_addr, wrap_app

from triows.serving import CheckedH11Connection, HTTP11OnlyProtocol


def moved(what: str, use: str) -> str:
    return f"hypercorn {what} moved: triows/serving.py relies on it for {use}"


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def global_names(function: Callable[..., Any]) -> set[str]:
    """The global names ``function``'s code looks up (nested code objects included)."""
    names: set[str] = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if inspect.iscode(const))
    return names


class Recorder:
    """A protocol's ``send``: keeps every event Hypercorn hands it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def __call__(self, event: Any) -> None:
        self.events.append(event)


def h11_protocol(send: Recorder) -> H11Protocol:
    protocol = ProtocolWrapper(
        None,
        Config(),
        WorkerContext(None),
        None,
        None,
        False,
        None,
        None,
        send,
    ).protocol
    assert isinstance(protocol, H11Protocol)
    return protocol


# Names looked up when a connection is served (replaced by install_hypercorn_adaptation)


def test_worker_serve_builds_tcp_server_by_its_module_global_name() -> None:
    assert "TCPServer" in vars(hypercorn_run), moved(
        "hypercorn.trio.run.TCPServer", "DeadlineTCPServer (write deadline, keep-alive timer)"
    )
    assert "TCPServer" in global_names(hypercorn_run.worker_serve), moved(
        "worker_serve's use of the TCPServer global", "installing DeadlineTCPServer"
    )


def test_tcp_server_builds_protocol_wrapper_by_its_module_global_name() -> None:
    assert "ProtocolWrapper" in vars(tcp_server), moved(
        "hypercorn.trio.tcp_server.ProtocolWrapper", "HTTP11OnlyProtocol (HTTP/2 refused)"
    )
    assert "ProtocolWrapper" in global_names(TCPServer.run), moved(
        "TCPServer.run's use of the ProtocolWrapper global", "installing HTTP11OnlyProtocol"
    )


# TCPServer (DeadlineTCPServer's base)


def test_tcp_server_init_signature() -> None:
    assert parameters(TCPServer.__init__) == [
        "self",
        "app",
        "config",
        "context",
        "state",
        "stream",
    ], moved("TCPServer.__init__(app, config, context, state, stream)", "DeadlineTCPServer")


@pytest.mark.parametrize(
    ("name", "use"),
    [
        ("stream", "wrapping the accepted stream in WriteDeadlineStream"),
        ("send_lock", "the write fast path (the lock only when a write must wait)"),
        ("idle_task", "KeepAliveTimer in place of TrioSingleTask"),
        ("config", "KeepAliveTimer (keep_alive_timeout)"),
        ("context", "KeepAliveTimer (context.terminated)"),
    ],
)
def test_tcp_server_instance_attribute(name: str, use: str) -> None:
    server = TCPServer(None, Config(), WorkerContext(None), None, None)
    assert name in vars(server), moved(f"TCPServer.{name}", use)


def test_tcp_server_send_lock_is_a_trio_lock() -> None:
    server = TCPServer(None, Config(), WorkerContext(None), None, None)
    assert isinstance(server.send_lock, trio.Lock), moved(
        "TCPServer.send_lock (a trio.Lock)", "acquire_nowait/locked in the write fast path"
    )


@pytest.mark.parametrize(
    ("name", "use"),
    [
        ("protocol_send", "the write fast path (DeadlineTCPServer.protocol_send)"),
        ("_initiate_server_close", "KeepAliveTimer closing an idle connection"),
        ("run", "the protocol attribute set when a connection starts"),
    ],
)
def test_tcp_server_method(name: str, use: str) -> None:
    assert callable(getattr(TCPServer, name, None)), moved(f"TCPServer.{name}", use)


def test_tcp_server_sets_its_protocol_and_idle_timer_in_run() -> None:
    names = global_names(TCPServer.run)
    assert {"protocol", "idle_task", "_task_group"} <= names, moved(
        "TCPServer.run's protocol, idle_task and _task_group",
        "Closed() sent to self.protocol and KeepAliveTimer.restart(task_group, ...)",
    )


def test_idle_timer_interface() -> None:
    assert parameters(TrioSingleTask.restart) == ["self", "task_group", "action"], moved(
        "TrioSingleTask.restart(task_group, action)", "KeepAliveTimer.restart"
    )
    assert parameters(TrioSingleTask.stop) == ["self"], moved(
        "TrioSingleTask.stop()", "KeepAliveTimer.stop"
    )


def test_task_group_keeps_its_nursery() -> None:
    assert "_nursery" in vars(TaskGroup()), moved(
        "hypercorn.trio.task_group.TaskGroup._nursery", "KeepAliveTimer starting its watcher"
    )


def test_worker_context_terminated_event() -> None:
    terminated = getattr(WorkerContext(None), "terminated", None)
    assert callable(getattr(terminated, "wait", None)), moved(
        "WorkerContext.terminated.wait()", "KeepAliveTimer ending at worker shutdown"
    )


def test_raw_data_and_closed_events() -> None:
    assert RawData(data=b"x").data == b"x", moved("hypercorn.events.RawData(data=)", "writes")
    assert Closed() == Closed(), moved("hypercorn.events.Closed", "closing a connection")


# ProtocolWrapper and H11Protocol (HTTP11OnlyProtocol)


def test_protocol_wrapper_init_signature() -> None:
    assert parameters(ProtocolWrapper.__init__) == [
        "self",
        "app",
        "config",
        "context",
        "task_group",
        "state",
        "ssl",
        "client",
        "server",
        "send",
        "alpn_protocol",
    ], moved("ProtocolWrapper.__init__'s parameters", "HTTP11OnlyProtocol.__init__")


def test_http11_only_protocol_puts_its_checked_connection_in_h11_protocol() -> None:
    send = Recorder()
    wrapper = HTTP11OnlyProtocol(
        None, Config(), WorkerContext(None), None, None, False, None, None, send, "h2"
    )
    assert isinstance(wrapper.protocol, H11Protocol), moved(
        "ProtocolWrapper.protocol (H11Protocol without ALPN h2)", "serving HTTP/1.1 only"
    )
    assert isinstance(wrapper.protocol.connection, CheckedH11Connection), moved(
        "H11Protocol.connection", "refusing doubtful request heads before h11 reads them"
    )
    assert wrapper.send is send, moved("ProtocolWrapper.send", "sending GOAWAY and Closed")


def test_h11_protocol_connection_is_an_h11_server_connection() -> None:
    connection = h11_protocol(Recorder()).connection
    assert isinstance(connection, h11.Connection) and connection.our_role is h11.SERVER, moved(
        "H11Protocol.connection (an h11 server Connection)", "CheckedH11Connection"
    )
    assert hasattr(Config(), "h11_max_incomplete_size"), moved(
        "Config.h11_max_incomplete_size", "CheckedH11Connection's size limit"
    )


async def test_h11_protocol_raises_h2_protocol_assumed_error_for_the_preface() -> None:
    send = Recorder()
    protocol = h11_protocol(send)
    with pytest.raises(H2ProtocolAssumedError):
        await protocol.handle(RawData(data=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    assert send.events == [Updated(idle=False)], moved(
        "H11Protocol's handling of the HTTP/2 preface", "HTTP11OnlyProtocol's GOAWAY"
    )


async def test_h11_protocol_upgrades_to_h2c_from_the_request_event_headers() -> None:
    # CheckedH11Connection strips Upgrade: h2c from the h11 Request event; that
    # works only as long as H11Protocol decides on that event's headers.
    with pytest.raises(H2CProtocolRequiredError):
        await h11_protocol(Recorder()).handle(
            RawData(
                data=b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
        )


# Config, worker_serve and helpers


@pytest.mark.parametrize(
    "name",
    [
        "bind",
        "websocket_max_message_size",
        "graceful_timeout",
        "accesslog",
        "errorlog",
        "alpn_protocols",
        "keep_alive_timeout",
        "backlog",
        "wsgi_max_body_size",
    ],
)
def test_config_attribute(name: str) -> None:
    assert hasattr(Config(), name), moved(f"Config.{name}", "hypercorn_config")


def test_worker_serve_signature() -> None:
    assert {"sockets", "shutdown_trigger", "task_status"} <= set(
        parameters(hypercorn_run.worker_serve)
    ), moved("worker_serve(sockets=, shutdown_trigger=, task_status=)", "serving a worker")


def test_helpers_signatures() -> None:
    assert parameters(wrap_app) == ["app", "wsgi_max_body_size", "mode"], moved(
        "hypercorn.utils.wrap_app(app, wsgi_max_body_size, mode)", "serving a worker"
    )
    assert parameters(repr_socket_addr) == ["family", "address"], moved(
        "hypercorn.utils.repr_socket_addr(family, address)", "the URL file"
    )


def test_websocket_handshake_builds_permessage_deflate_by_its_module_global_name() -> None:
    # (triows.dataplane.refuse_permessage_deflate, which plain Hypercorn runs too.)
    assert "PerMessageDeflate" in vars(ws_stream), moved(
        "hypercorn.protocol.ws_stream.PerMessageDeflate", "declining permessage-deflate"
    )
    assert "PerMessageDeflate" in global_names(ws_stream.Handshake.accept), moved(
        "Handshake.accept's use of the PerMessageDeflate global", "declining permessage-deflate"
    )


def test_the_websocket_stream_is_built_by_name_in_the_h11_protocol() -> None:
    from hypercorn.protocol import h11 as hypercorn_h11

    use = "telling the app the code a client closed with (ClientCloseWSStream)"
    assert "WSStream" in global_names(H11Protocol._create_stream), moved("H11Protocol", use)
    assert vars(hypercorn_h11).get("WSStream") is not None, moved("h11.WSStream", use)
    source = inspect.getsource(ws_stream.WSStream._handle_events)
    # ClientCloseWSStream._handle_events is a copy of this one with one line added.
    for name in ("self.buffer.extend", "message_finished", "REMOTE_CLOSING", "StreamClosed"):
        assert name in source, moved("WSStream._handle_events", use)
    assert "client_close_code" not in source, "Hypercorn reports the client's code now: drop it"
