"""What a real ``triows serve`` tells clients, and what it keeps for its own log.

The broker's address is the operator's business: a client that gets a 503 or
an ``unavailable`` frame is told to retry, the log line says which broker.
The log keeps a line per connection, not one per join.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from triows.client import open_events, post_send
from triows.process import free_port, serve_instance

# Hang guard only: no test asserts on how long something took.
STEP_TIMEOUT = 30


def logged(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def test_answers_for_a_down_broker_do_not_name_its_address_but_the_log_does(
    tmp_path: Path,
) -> None:
    closed_port = free_port()
    log_path = tmp_path / "stderr"
    with log_path.open("wb") as log:
        async with serve_instance(
            "amqp091",
            broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port}/",
            # Without sessions, so that the socket opens (a session needs the
            # broker: it closes with 1013 and the same BROKER_UNAVAILABLE words).
            env={"TRIOWS_LOG_LEVEL": "INFO", "TRIOWS_RESUME_WINDOW": "0"},
            stderr=log.fileno(),
        ) as instance:
            async with httpx.AsyncClient() as http:
                answer = await post_send(http, instance.base_url, "Bob", "hi", sender="Anne")
            async with open_events(instance.base_url, user="Anne") as anne:
                await anne.send("Bob", "hi", ref="r1")
                with trio.fail_after(STEP_TIMEOUT):
                    frame = await anne.receive()
    assert answer.status_code == 503
    assert answer.json()["type"].endswith("/broker-unavailable")
    assert (frame["type"], frame["code"]) == ("error", "unavailable")
    for told in (answer.text, json.dumps(frame)):
        assert str(closed_port) not in told and "127.0.0.1" not in told, told
    failures = [event for event in logged(log_path) if event["event"] == "publish_failed"]
    assert failures and all(str(closed_port) in event["error"] for event in failures)


async def test_a_join_is_not_logged_at_info_while_connect_and_disconnect_are(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "stderr"
    with log_path.open("wb") as log:
        async with serve_instance(
            env={"TRIOWS_LOG_LEVEL": "INFO"}, stderr=log.fileno()
        ) as instance:
            async with open_events(instance.base_url, user="Anne") as anne:
                await anne.join("general", ref="j1")
                with trio.fail_after(STEP_TIMEOUT):
                    assert (await anne.receive())["type"] == "joined"
    events = [event["event"] for event in logged(log_path)]
    assert "connect" in events and "disconnect" in events
    assert "join" not in events
