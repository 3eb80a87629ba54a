"""Dev mode (no secret) serves loopback only, also under plain Hypercorn, and names are resolved.

``triows serve`` checks its bind addresses at start-up; under
``hypercorn 'triows.app:create_app()'`` the app cannot see Hypercorn's binds,
so it checks each connection's local address as the server reports it.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from triows.app import create_app
from triows.process import stop_process
from triows.settings import Settings, _is_loopback

START_TIMEOUT = 30


async def call(app: Any, server: object) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [], "server": server}
    scope |= {"query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http"}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("server", [("10.1.2.3", 8000), ("2001:db8::1", 8000), None])
async def test_dev_mode_refuses_a_request_that_came_in_on_a_non_loopback_address(
    server: object,
) -> None:
    sent = await call(create_app(Settings()), server)
    assert sent[0]["status"] == 403


async def test_insecure_dev_mode_and_a_secret_serve_any_address() -> None:
    for settings in (Settings(insecure=True), Settings(secret="s" * 32)):
        app = create_app(settings)
        assert not app.guards_dev_mode


async def test_plain_hypercorn_on_a_unix_socket_refuses_dev_mode(tmp_path: Path) -> None:
    path = tmp_path / "triows.sock"
    for insecure, status in (("0", 403), ("1", 200)):
        command = [sys.executable, "-m", "hypercorn", "-k", "trio", "-b", f"unix:{path}"]
        command.append("triows.app:create_app()")
        env = {"TRIOWS_INSECURE": insecure, "TRIOWS_LOG_LEVEL": "WARNING", "PATH": "/usr/bin"}
        process = await trio.lowlevel.open_process(command, env=env)
        try:
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with httpx.AsyncClient(transport=transport) as http:
                with trio.fail_after(START_TIMEOUT):
                    while True:
                        try:
                            response = await http.get("http://triows/healthz")
                            break
                        except httpx.TransportError:
                            await trio.sleep(0.05)
            assert response.status_code == status, response.text
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(process)
            path.unlink(missing_ok=True)


def test_localhost_is_resolved_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _is_loopback("localhost")
    assert _is_loopback("127.0.0.2") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0")
    assert not _is_loopback("no-such-host.invalid")

    def routable(host: str, *args: object, **kwargs: object) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", routable)
    assert not _is_loopback("localhost")
    assert not Settings(bind=("localhost:8000",)).binds_loopback_only
