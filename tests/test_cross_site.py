"""Pages of other sites and rebound names, against real ``triows serve`` processes.

A browser lets any page open a WebSocket or an ``EventSource`` to any server
and says which page it is in ``Origin``; DNS rebinding sends the attacker's
name as ``Host``. Each test sends what such a browser sends, over raw sockets
(h11), and the chat page's own headers are read as a browser gets them.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpx
import trio

from triows.auth import mint_token
from triows.process import Instance, serve_instance

# Hang guard only: no test asserts on how long something took.
STEP_TIMEOUT = 30
SECRET = "cross-site-secret-" + "x" * 48
EVIL = "https://evil.example"


def port_of(instance: Instance) -> int:
    return int(instance.base_url.rsplit(":", 1)[1])


@asynccontextmanager
async def handshake(
    instance: Instance, path: str, headers: dict[str, str]
) -> AsyncIterator[tuple[int, dict[str, str], bytes]]:
    """Send a WebSocket handshake for ``path``; yield (status, headers, body), socket still open.

    ``headers`` are sent as given (``Host`` among them: the default is the
    instance's own address).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(instance))
    async with stream:
        client = h11.Connection(h11.CLIENT)
        key = base64.b64encode(os.urandom(16)).decode()
        request_headers = {
            "Host": f"127.0.0.1:{port_of(instance)}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
            **headers,
        }
        request = h11.Request(method="GET", target=path, headers=list(request_headers.items()))
        await stream.send_all(client.send(request) or b"")
        response: h11.Response | h11.InformationalResponse | None = None
        body = b""
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await stream.receive_some())
                elif isinstance(event, h11.InformationalResponse | h11.Response):
                    response = event
                    if event.status_code == 101:
                        break
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        assert response is not None
        found = {name.decode(): value.decode() for name, value in response.headers}
        yield response.status_code, found, body


async def handshake_status(instance: Instance, path: str, headers: dict[str, str]) -> int:
    async with handshake(instance, path, headers) as (status, _, _):
        return status


async def stream_status(instance: Instance, headers: dict[str, str]) -> int:
    """The status of ``GET /events?user=Bob`` as Server-Sent Events (the stream then closed)."""
    async with httpx.AsyncClient(base_url=instance.base_url) as http:
        request_headers = {"Accept": "text/event-stream", **headers}
        with trio.fail_after(STEP_TIMEOUT):
            async with http.stream("GET", "/events?user=Bob", headers=request_headers) as answer:
                return answer.status_code


async def test_a_websocket_handshake_from_another_sites_page_gets_403_problem_details() -> None:
    async with serve_instance() as instance:
        async with handshake(instance, "/events?user=Bob", {"Origin": EVIL}) as answer:
            status, headers, body = answer
    assert status == 403
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["type"].endswith("/forbidden-origin")


async def test_a_websocket_handshake_from_the_servers_own_page_or_no_page_connects() -> None:
    async with serve_instance() as instance:
        own = f"http://127.0.0.1:{port_of(instance)}"
        assert await handshake_status(instance, "/events?user=Bob", {"Origin": own}) == 101
        assert await handshake_status(instance, "/events?user=Bob", {}) == 101


async def test_an_origin_that_only_looks_like_the_server_is_refused() -> None:
    async with serve_instance() as instance:
        port = port_of(instance)
        for origin in (
            "null",
            f"http://127.0.0.1:{port + 1}",
            f"http://127.0.0.1:{port}.evil.example",
            f"http://127.0.0.1:{port}/path",
            f"http://user@127.0.0.1:{port}",
            f"ftp://127.0.0.1:{port}",
        ):
            status = await handshake_status(instance, "/events?user=Bob", {"Origin": origin})
            assert status == 403, origin


async def test_an_event_stream_from_another_sites_page_gets_403_and_its_own_page_200() -> None:
    async with serve_instance() as instance:
        assert await stream_status(instance, {"Origin": EVIL}) == 403
        assert await stream_status(instance, {"Origin": instance.base_url}) == 200
        assert await stream_status(instance, {}) == 200


async def test_a_listed_origin_may_connect_and_others_still_may_not() -> None:
    env = {"TRIOWS_ALLOWED_ORIGINS": "https://chat.example.com, http://localhost:3000"}
    async with serve_instance(env=env) as instance:
        for origin, status in (
            ("https://chat.example.com", 101),
            ("https://CHAT.example.com:443", 101),
            ("http://localhost:3000", 101),
            ("http://chat.example.com", 403),
            (EVIL, 403),
        ):
            assert await handshake_status(instance, "/events?user=Bob", {"Origin": origin}) == (
                status
            ), origin
        assert await stream_status(instance, {"Origin": "https://chat.example.com"}) == 200


async def test_an_allowed_origin_of_star_lets_any_page_connect() -> None:
    async with serve_instance(env={"TRIOWS_ALLOWED_ORIGINS": "*"}) as instance:
        assert await handshake_status(instance, "/events?user=Bob", {"Origin": EVIL}) == 101


async def test_with_a_secret_another_sites_page_holding_a_token_is_refused() -> None:
    token = mint_token(SECRET, "Bob")
    async with serve_instance(env={"TRIOWS_SECRET": SECRET}) as instance:
        path = f"/events?token={token}"
        assert await handshake_status(instance, path, {"Origin": EVIL}) == 403
        assert await handshake_status(instance, path, {}) == 101


async def test_dev_mode_refuses_a_rebound_host_name_on_every_route() -> None:
    async with serve_instance() as instance:
        rebound = f"rebound.evil.example:{port_of(instance)}"
        # The rebound page's own origin is the attacker's name: same-origin for Origin.
        status = await handshake_status(
            instance, "/events?user=Bob", {"Host": rebound, "Origin": f"http://{rebound}"}
        )
        assert status == 403
        async with httpx.AsyncClient(base_url=instance.base_url) as http:
            for method, path in (("GET", "/"), ("GET", "/metrics"), ("POST", "/send")):
                answer = await http.request(method, path, headers={"Host": rebound})
                assert answer.status_code == 403, path
                assert answer.json()["type"].endswith("/forbidden-host")
            for host in ("localhost", f"localhost:{port_of(instance)}", "[::1]:1", "127.0.0.2"):
                assert (await http.get("/", headers={"Host": host})).status_code == 200, host


async def test_a_listed_host_name_is_served_and_with_a_secret_only_then_checked() -> None:
    async with serve_instance(env={"TRIOWS_ALLOWED_HOSTS": "chat.example.com"}) as instance:
        async with httpx.AsyncClient(base_url=instance.base_url) as http:
            assert (await http.get("/", headers={"Host": "chat.example.com"})).status_code == 200
            assert (await http.get("/", headers={"Host": "evil.example"})).status_code == 403
    async with serve_instance(env={"TRIOWS_SECRET": SECRET}) as instance:
        async with httpx.AsyncClient(base_url=instance.base_url) as http:
            # Behind a load balancer the Host is the public name: not checked unless listed.
            assert (await http.get("/", headers={"Host": "chat.example.com"})).status_code == 200
    env = {"TRIOWS_SECRET": SECRET, "TRIOWS_ALLOWED_HOSTS": "chat.example.com"}
    async with serve_instance(env=env) as instance:
        async with httpx.AsyncClient(base_url=instance.base_url) as http:
            assert (await http.get("/", headers={"Host": "evil.example"})).status_code == 403


async def test_the_chat_page_forbids_framing_sniffing_referrers_and_foreign_scripts() -> None:
    async with serve_instance() as instance:
        async with httpx.AsyncClient(base_url=instance.base_url) as http:
            page = await http.get("/")
            # The page is served at "/" only, never without these headers.
            assert (await http.get("/static/chat.html")).status_code == 404
    headers: Any = page.headers
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    directives = headers["content-security-policy"].split(";")
    policy = dict(directive.strip().split(" ", 1) for directive in directives)
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'"
    # The page's own inline script by its hash, and the client module of its origin.
    self_source, inline_hash = policy["script-src"].split()
    assert (self_source, inline_hash[:8]) == ("'self'", "'sha256-")
    assert "unsafe" not in headers["content-security-policy"]
