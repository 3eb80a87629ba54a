"""``triows serve`` under a low open-file limit: handshakes past the limit get 503, never hang.

Each test starts a real ``triows serve`` whose hard ``RLIMIT_NOFILE`` is low
(as ``ulimit -n`` or a container's limit would set it) and opens WebSocket
handshakes over raw sockets, more than it has descriptors for.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import sys
from pathlib import Path

import h11
import httpx
import pytest
import trio

from triows.logs import ACCEPT_LOGGER, configure_logging
from triows.process import free_port, stop_process, wait_for_status
from triows.settings import Settings

# Hang guard only: no test asserts on how long something took.
STEP_TIMEOUT = 60
OPEN_FILES = 64
HANDSHAKES = 70


def limit_open_files() -> None:
    """Run in the child before exec: soft and hard limits both low, as ``ulimit -n`` sets them."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


async def start_serve(tmp_path: Path, env: dict[str, str]) -> tuple[trio.Process, str, Path]:
    port = free_port()
    stderr_path = tmp_path / "stderr"
    command = [sys.executable, "-m", "triows", "serve", "--bind", f"127.0.0.1:{port}"]
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            command,
            env={**os.environ, "TRIOWS_LOG_LEVEL": "INFO", **env},
            stderr=stderr,
            preexec_fn=limit_open_files,
        )
    return process, f"http://127.0.0.1:{port}", stderr_path


async def handshake(port: int, user: str, held: list[trio.SocketStream]) -> int:
    """A WebSocket handshake's status; a 101's socket is kept open in ``held``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = h11.Connection(h11.CLIENT)
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    request = h11.Request(method="GET", target=f"/events?user={user}", headers=headers)
    await stream.send_all(client.send(request) or b"")
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())
        elif isinstance(event, h11.InformationalResponse | h11.Response):
            break
    if event.status_code == 101:
        held.append(stream)
    else:
        await stream.aclose()
    return event.status_code


async def test_handshakes_past_a_low_open_file_limit_get_101_or_503_and_healthz_answers(
    tmp_path: Path,
) -> None:
    process, base_url, stderr_path = await start_serve(tmp_path, {})
    port = int(base_url.rsplit(":", 1)[1])
    held: list[trio.SocketStream] = []
    statuses: list[int] = []
    try:
        await wait_for_status(f"{base_url}/healthz", 200)

        async def one(number: int) -> None:
            statuses.append(await handshake(port, f"user{number}", held))

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for number in range(HANDSHAKES):
                    nursery.start_soon(one, number)
            async with httpx.AsyncClient() as http:
                healthz = await http.get(f"{base_url}/healthz")
    finally:
        for stream in held:
            await stream.aclose()
        with trio.CancelScope(shield=True):
            await stop_process(process)
    assert healthz.status_code == 200
    assert set(statuses) == {101, 503}, sorted(statuses)
    lines = stderr_path.read_text().splitlines()
    events = [json.loads(line) for line in lines if line]  # no traceback: every line is JSON
    clamped = [event for event in events if event["event"] == "max_connections_lowered"]
    assert len(clamped) == 1, events
    assert clamped[0]["max_connections"] == Settings().max_connections
    assert clamped[0]["open_file_limit"] == OPEN_FILES
    assert statuses.count(101) == clamped[0]["lowered_to"]


async def test_a_limit_without_room_for_one_connection_refuses_to_start_with_one_line(
    tmp_path: Path,
) -> None:
    process, _, stderr_path = await start_serve(
        tmp_path, {"TRIOWS_OPEN_FILES_RESERVE": str(OPEN_FILES)}
    )
    with trio.fail_after(STEP_TIMEOUT):
        await process.wait()
    assert process.returncode == 2
    (line,) = stderr_path.read_text().splitlines()
    assert "open-file limit (64)" in line and "TRIOWS_OPEN_FILES_RESERVE=64" in line


def test_failed_accepts_are_one_json_line_per_interval_without_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("test-instance")
    accept_logger = logging.getLogger(ACCEPT_LOGGER)
    for _ in range(50):
        try:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        except OSError:
            # What trio's accept loop logs on each failed accept.
            accept_logger.error(
                "accept returned %s (%s); retrying in %s seconds",
                "EMFILE",
                os.strerror(errno.EMFILE),
                0.1,
                exc_info=True,
            )
    (line,) = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "accept_failed"
    assert "EMFILE" in event["reason"]
    assert "exception" not in event
