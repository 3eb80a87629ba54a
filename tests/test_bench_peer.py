"""The bench's peer target and its socket.io client, the batch sender, and the scale-out report.

The peer (``bench/peer_socketio.py``: python-socketio + aio-pika on uvicorn) is
what triows is measured against, so the bench must drive it exactly as it
drives triows: a message POSTed to one instance reaches the socket.io client
of its recipient on another, through RabbitMQ's fanout, and only there.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.__main__ import _failed
from bench.peer import open_socketio, serve_peer
from bench.report import markdown, write
from bench.scenarios import Options, open_pair, run_traffic
from bench.targets import PEER_TARGETS
from tests.brokers import require_broker
from triows.client import open_send_connection

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_URL = PEER_TARGETS["peer-socketio"].broker_url
# Hang guards only.
PEER_TIMEOUT = 60
QUICK_SCENARIOS_TIMEOUT = 300


@pytest.mark.broker
async def test_a_post_to_one_peer_instance_reaches_the_recipient_on_another_only() -> None:
    await require_broker("rabbitmq")
    channel = f"triows-test-peer-{secrets.token_hex(4)}"
    with trio.fail_after(PEER_TIMEOUT):
        async with (
            serve_peer(broker_url=RABBITMQ_URL, channel=channel) as a,
            serve_peer(broker_url=RABBITMQ_URL, channel=channel) as b,
        ):
            await a.wait_ready()
            await b.wait_ready()
            async with (
                open_socketio(b.base_url, user="bob") as bob,
                open_socketio(b.base_url, user="carol") as carol,
                open_send_connection(a.base_url) as http,
            ):
                assert bob.sid and carol.sid
                status, body = await http.send("bob", {"n": 1})
                assert (status, json.loads(body)) == (202, {"status": "accepted"})
                status, _ = await http.send("carol", {"n": 2})
                assert status == 202
                assert await bob.receive() == {"type": "message", "message": {"n": 1}}
                # Carol's first message is her own: Bob's did not reach her.
                assert await carol.receive() == {"type": "message", "message": {"n": 2}}


@pytest.mark.broker
async def test_a_send_event_is_acknowledged_and_reaches_the_recipient_on_another_instance() -> None:
    # What a python-socketio chat client does: sio.call("send", {...}) on its own socket.
    await require_broker("rabbitmq")
    channel = f"triows-test-peer-{secrets.token_hex(4)}"
    with trio.fail_after(PEER_TIMEOUT):
        async with (
            serve_peer(broker_url=RABBITMQ_URL, channel=channel) as a,
            serve_peer(broker_url=RABBITMQ_URL, channel=channel) as b,
        ):
            await a.wait_ready()
            await b.wait_ready()
            async with (
                open_socketio(a.base_url, user="alice") as alice,
                open_socketio(b.base_url, user="bob") as bob,
            ):
                await alice.send("bob", {"n": 1}, ref="7")
                assert await alice.receive() == {"type": "ack", "ref": "7"}
                assert await bob.receive() == {"type": "message", "message": {"n": 1}}


@pytest.mark.broker
async def test_the_peer_takes_a_batch_and_answers_each_item() -> None:
    await require_broker("rabbitmq")
    channel = f"triows-test-peer-{secrets.token_hex(4)}"
    with trio.fail_after(PEER_TIMEOUT):
        async with serve_peer(broker_url=RABBITMQ_URL, channel=channel) as peer:
            await peer.wait_ready()
            async with open_socketio(peer.base_url, user="dave") as dave:
                async with open_send_connection(peer.base_url) as http:
                    items = [{"to": "dave", "message": {"n": n}} for n in range(3)]
                    status, body = await http.post(json.dumps(items).encode())
                assert status == 200
                assert json.loads(body) == [{"status": "accepted"}] * 3
                assert [(await dave.receive())["message"] for _ in range(3)] == [
                    {"n": 0},
                    {"n": 1},
                    {"n": 2},
                ]


@pytest.mark.broker
async def test_quick_direct_direct_ws_and_batch_on_the_peer_lose_nothing() -> None:
    await require_broker("rabbitmq")
    options = Options.quick_options()
    target = PEER_TARGETS["peer-socketio"]
    with trio.fail_after(QUICK_SCENARIOS_TIMEOUT):
        async with open_pair(target, f"triows-test-peer-{secrets.token_hex(4)}") as pair:
            rows = [
                await run_traffic(pair, name, options, None)
                for name in ("direct", "direct-ws", "batch")
            ]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["delivered"] > 0, row
        assert (row["lost"], row["duplicated"], row["out_of_order"]) == (0, 0, 0), row
        assert set(row["instance_cpu_percent"]) == {"instance_a", "instance_b"}
    assert rows[1]["params"]["ws_window"] == options.ws_window
    assert rows[2]["params"]["batch_size"] == options.batch_size


def _scaleout_row(target: str, instances: int, msg_per_s: float, ms: float) -> dict[str, Any]:
    cpu = {f"instance_{chr(ord('a') + index)}": 10.0 for index in range(instances)}
    return {
        "target": target,
        "backend": "-",
        "broker": "rabbitmq",
        "scenario": "scaleout",
        "status": "ok",
        "instances": instances,
        "msg_per_s": msg_per_s,
        "server_cpu_ms_per_message": ms,
        "instance_cpu_percent": cpu,
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "cpu_per_1000": {"instance_a": 1.0},
        "loadgen_cpu_share": 0.1,
        "loadgen_saturated": False,
        "other_cpu_cores": 0.0,
    }


def _result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "started": "2026-01-01 00:00:00 UTC",
        "quick": False,
        "run_seconds": 1.0,
        "command": "python -m bench scaleout",
        "machine": {"cpu_model": "test", "logical_cores": 2},
        "rows": rows,
    }


def test_the_scaleout_report_gives_triows_over_peer_per_instance_count(tmp_path: Path) -> None:
    rows = [
        _scaleout_row("amqp091-rabbitmq", 2, 600.0, 2.0),
        _scaleout_row("amqp091-rabbitmq", 6, 500.0, 2.0),
        _scaleout_row("peer-socketio", 2, 1200.0, 1.0),
        _scaleout_row("peer-socketio", 6, 250.0, 4.0),
    ]
    text = markdown(_result(rows))
    assert "| **amqp091-rabbitmq / peer** | 2 | 0.50x | | 2.00x | |" in text
    assert "| **amqp091-rabbitmq / peer** | 6 | 2.00x | | 0.50x | |" in text
    assert "| peer-socketio | 6 | 250 | 10, 10, 10, 10, 10, 10 | 4.000 |" in text
    paths = write(_result(rows), tmp_path, "scaleout-test")
    assert [path.name for path in paths] == [
        "scaleout-test.json",
        "scaleout-test.md",
        "scaleout-test.png",
    ]
    assert paths[2].stat().st_size > 0


def test_a_peer_row_that_does_not_apply_is_not_a_failure() -> None:
    rows = [
        {"target": "peer-socketio", "scenario": "ceiling", "status": "n/a", "error": "triows"},
        {"target": "memory", "scenario": "batch", "status": "error", "error": "HTTP 400"},
    ]
    assert _failed(rows) == ["memory/batch: HTTP 400"]


def test_scaleout_refuses_fewer_than_two_instances() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "scaleout", "--instances", "1,2"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 2
    assert b"at least 2 instances" in result.stderr
