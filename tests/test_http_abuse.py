"""HTTP-level abuse of a real ``triows serve``, by raw sockets and an HTTP/2 client.

triows serves HTTP/1.1 only: HTTP/2 (prior knowledge or an h2c upgrade) is
refused; request heads a proxy could read otherwise get 400 and a close; a
``POST /send`` body is read only from a client with valid credentials, within
``TRIOWS_BODY_TIMEOUT``, and a body cut short is not carried out.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import h2.connection
import h2.events
import httpx
import psutil
import pytest
import trio

from tests.e2e import STEP_TIMEOUT, assert_next_message
from triows.auth import mint_token
from triows.client import open_events, post_send
from triows.process import Instance, serve_instance
from triows.serving import request_head_problem

SECRET = "http-abuse-secret-" + "x" * 48
MIB = 1 << 20
POLL_INTERVAL = 0.05


def port_of(instance: Instance) -> int:
    return int(instance.base_url.rsplit(":", 1)[1])


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (the hang guard is the caller's)."""
    received = b""
    while True:
        try:
            data = await stream.receive_some()
        except trio.BrokenResourceError:  # a reset once the server closed
            return received
        if not data:
            return received
        received += data


async def exchange_until_close(instance: Instance, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection; return what comes back until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(instance))
    async with stream:
        await stream.send_all(raw)
        with trio.fail_after(STEP_TIMEOUT):
            return await read_to_eof(stream)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; the hang guard makes a failure of it."""
    with trio.fail_after(STEP_TIMEOUT):
        # Another process's file descriptors: nothing to wait on but the count.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(POLL_INTERVAL)


def open_fds(instance: Instance) -> int:
    return psutil.Process(instance.process.pid).num_fds()


async def open_h2(instance: Instance) -> tuple[trio.SocketStream, h2.connection.H2Connection]:
    """A cleartext HTTP/2 connection with prior knowledge: the client preface is sent."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(instance))
    connection = h2.connection.H2Connection()
    connection.initiate_connection()
    await stream.send_all(connection.data_to_send())
    return stream, connection


async def h2_events_until_close(
    stream: trio.SocketStream, connection: h2.connection.H2Connection
) -> list[h2.events.Event]:
    """Every HTTP/2 event the server's bytes make, until it closes the connection."""
    events: list[h2.events.Event] = []
    with trio.fail_after(STEP_TIMEOUT):
        received = await read_to_eof(stream)
    events.extend(connection.receive_data(received))
    return events


def h2_request_headers(method: str, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":path", path),
        (":scheme", "http"),
        (":authority", "127.0.0.1"),
        *extra,
    ]


# HTTP/2


async def test_an_http2_preface_gets_goaway_http_1_1_required_and_a_close() -> None:
    async with serve_instance("memory") as server:
        stream, connection = await open_h2(server)
        async with stream:
            connection.send_headers(1, h2_request_headers("GET", "/healthz"), end_stream=True)
            await stream.send_all(connection.data_to_send())
            events = await h2_events_until_close(stream, connection)
    assert not any(isinstance(event, h2.events.ResponseReceived) for event in events), events
    terminated = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert [event.error_code for event in terminated] == [h2.errors.ErrorCodes.HTTP_1_1_REQUIRED]


async def test_half_sent_http2_posts_leave_no_socket_behind() -> None:
    # Each starts a POST /send over HTTP/2, sends part of its body and goes away.
    async with serve_instance("memory", env={"TRIOWS_SECRET": SECRET}) as server:
        before = open_fds(server)
        for _ in range(50):
            stream, connection = await open_h2(server)
            headers = h2_request_headers(
                "POST", "/send", ("content-type", "application/json"), ("content-length", "200")
            )
            connection.send_headers(1, headers)
            connection.send_data(1, b'{"to": "Bob", "message": "part of a')
            # The server may refuse before the body went out.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(connection.data_to_send())
            await stream.aclose()
        await wait_until(lambda: open_fds(server) <= before)


async def test_an_event_stream_cannot_be_opened_over_http2() -> None:
    async with serve_instance("memory") as server:
        stream, connection = await open_h2(server)
        async with stream:
            headers = h2_request_headers("GET", "/events?user=Bob", ("accept", "text/event-stream"))
            connection.send_headers(1, headers, end_stream=True)
            await stream.send_all(connection.data_to_send())
            events = await h2_events_until_close(stream, connection)
    assert not any(isinstance(event, h2.events.ResponseReceived) for event in events), events
    assert any(isinstance(event, h2.events.ConnectionTerminated) for event in events), events


async def test_an_h2c_upgrade_is_ignored_and_served_as_http_1_1() -> None:
    async with serve_instance("memory") as server:
        answer = await exchange_until_close(
            server,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"upgrade" not in answer.lower()


# Request heads a proxy could read otherwise


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n b\r\n\r\n",
            id="obs-fold",
        ),
        pytest.param(b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n", id="bare-lf"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n",
            id="bare-lf-in-a-pipelined-second-request",
        ),
    ],
)
async def test_a_doubtful_request_head_gets_400_and_a_close(head: bytes) -> None:
    async with serve_instance("memory") as server:
        answer = await exchange_until_close(server, head)
    last_status_line = answer[answer.rfind(b"HTTP/1.1 ") :].split(b"\r\n", 1)[0]
    assert last_status_line.startswith(b"HTTP/1.1 400"), answer
    assert b"connection: close" in answer.lower()


GOOD_HEAD = b"POST /send HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
BAD_HEADS = {
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n": (
        "Content-Length and Transfer-Encoding"
    ),
    b"GET / HTTP/1.1\r\nX-A: b\r\n\tc\r\nHost: a\r\n\r\n": "obs-fold",
    b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n": "bare LF",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n": "bare LF",
}


def test_a_plain_request_head_passes_at_every_byte_boundary() -> None:
    for end in range(len(GOOD_HEAD) + 1):
        assert request_head_problem(GOOD_HEAD[:end]) is None, GOOD_HEAD[:end]


def test_a_body_after_the_head_is_not_read_as_head() -> None:
    assert request_head_problem(GOOD_HEAD + b"\n\n \tContent-Length: 1\r\n") is None


@pytest.mark.parametrize(("head", "named"), list(BAD_HEADS.items()))
def test_a_doubtful_head_is_refused_once_the_doubtful_part_is_in(head: bytes, named: str) -> None:
    problem = request_head_problem(head)
    assert problem is not None and named in problem, problem
    # Incomplete, it is refused as soon as the doubtful bytes and what ends them are in.
    answers = [request_head_problem(head[:end]) for end in range(len(head) + 1)]
    first = next(end for end, answer in enumerate(answers) if answer is not None)
    assert all(answer == problem for answer in answers[first:])


# POST /send bodies


async def test_a_body_without_credentials_is_refused_before_it_is_read() -> None:
    # Content-Length 1 MiB, 1 MiB - 1 bytes sent: the body never completes.
    async with serve_instance("memory", env={"TRIOWS_SECRET": SECRET}) as server:
        before = open_fds(server)
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(server))
        head = (
            b"POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % MIB
        )
        answer = b""
        async with stream, trio.open_nursery() as nursery:

            async def send_body() -> None:
                try:
                    await stream.send_all(head)
                    await stream.send_all(b"x" * (MIB - 1))
                except trio.BrokenResourceError:
                    pass  # the server closed the connection before taking it all

            nursery.start_soon(send_body)
            with trio.fail_after(STEP_TIMEOUT):
                while b"\r\n\r\n" not in answer:
                    data = await stream.receive_some()
                    assert data, f"closed without an answer: {answer!r}"
                    answer += data
                answer += await read_to_eof(stream)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        await wait_until(lambda: open_fds(server) <= before)


async def test_a_slow_authenticated_body_is_cut_at_the_body_timeout() -> None:
    env = {"TRIOWS_SECRET": SECRET, "TRIOWS_BODY_TIMEOUT": "1"}
    async with serve_instance("memory", env=env) as server:
        token = mint_token(SECRET, "Anne")
        head = (
            b"POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: 200\r\n\r\n" % token.encode()
        )
        # The rest of the body never comes; the connection stays open on this side.
        answer = await exchange_until_close(server, head + b'{"to": "Bob",')
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()


async def test_a_body_cut_short_by_a_disconnect_is_not_sent() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        async with open_events(server.base_url, user="Bob") as bob:
            body = json.dumps({"to": "Bob", "message": "cut", "from": "Anne"}).encode()
            assert len(body) == 47  # valid JSON, a quarter of what the head announced
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(server))
            async with stream:
                await stream.send_all(
                    b"POST /send HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n" + body
                )
                await stream.send_eof()
                # The server has dealt with the request once it closes its side.
                with trio.fail_after(STEP_TIMEOUT):
                    await read_to_eof(stream)
            sentinel = await post_send(http, server.base_url, "Bob", "after", sender="Anne")
            assert sentinel.status_code == 202, sentinel.text
            await assert_next_message(bob, sentinel.json()["id"], "after")
