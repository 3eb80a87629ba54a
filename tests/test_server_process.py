"""A real ``triows serve`` process on the memory backend, over real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from tests.brokers import require_broker
from tests.e2e import unique_exchange
from triows.client import open_events, post_send
from triows.process import serve_instance

ROOT = Path(__file__).resolve().parent.parent


async def test_core_scenario_on_one_instance_over_real_sockets() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        async with open_events(server.base_url, user="Bob") as bob:
            assert bob.hello["user"] == "Bob"
            response = await post_send(http, server.base_url, "Bob", {"text": "hi"}, sender="Anne")
            assert response.status_code == 202
            assert response.json()["status"] == "routed"
            message = await bob.receive()
            assert message["id"] == response.json()["id"]
            assert (message["from"], message["to"], message["message"]) == (
                "Anne",
                "Bob",
                {"text": "hi"},
            )
            async with open_events(server.base_url, user="Anne") as anne:
                await anne.send("Bob", [1, 2, 3], ref="a1")
                ack = await anne.receive()
                assert (ack["type"], ack["ref"], ack["status"]) == ("ack", "a1", "routed")
                assert (await bob.receive())["message"] == [1, 2, 3]


async def test_sigterm_closes_sockets_with_1012_and_exits_0() -> None:
    async with serve_instance("memory") as server:
        async with open_events(server.base_url, user="Bob") as bob:
            server.terminate()
            with trio.fail_after(20):
                assert await bob.wait_closed() == 1012
        with trio.fail_after(20):
            assert await server.process.wait() == 0


@pytest.mark.parametrize("backend", ["memory", "amqp091"])
async def test_sigint_then_sigterm_5_ms_later_still_drains_with_1012_and_exits_0(
    backend: str,
) -> None:
    # A terminal's Ctrl-C and a supervisor's SIGTERM arriving together: the
    # second signal must not cut the drain the first one started.
    env = {}
    if backend == "amqp091":
        await require_broker("rabbitmq")
        env["TRIOWS_EXCHANGE"] = unique_exchange()
    async with serve_instance(backend, env=env) as server:
        async with open_events(server.base_url, user="Bob") as bob:
            server.process.send_signal(signal.SIGINT)
            await trio.sleep(0.005)
            server.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await bob.wait_closed() == 1012
        with trio.fail_after(20):
            assert await server.process.wait() == 0


async def test_an_instance_binds_port_0_and_reports_the_port_it_got() -> None:
    async with serve_instance("memory") as server:
        command = server.process.args
        assert isinstance(command, list)
        # The kernel chose the port: nothing picked one first (and let it go).
        assert command[command.index("--bind") + 1] == "127.0.0.1:0"
        port = int(server.base_url.rsplit(":", 1)[1])
        listening = {
            connection.laddr.port
            for connection in psutil.Process(server.process.pid).net_connections("tcp")
            if connection.status == psutil.CONN_LISTEN
        }
        assert listening == {port}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triows", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_memory_backend_with_two_workers_is_refused_with_an_explanation() -> None:
    result = run_cli("serve", "--workers", "2", "--backend", "memory")
    assert result.returncode != 0
    assert "memory backend cannot carry a message from one process to another" in result.stderr


def test_dev_mode_on_a_public_address_is_refused() -> None:
    result = run_cli("serve", "--bind", "0.0.0.0:0")
    assert result.returncode != 0
    assert "TRIOWS_SECRET" in result.stderr and "TRIOWS_INSECURE" in result.stderr


def test_invalid_setting_fails_with_one_line_naming_it() -> None:
    result = run_cli("serve", env={**os.environ, "TRIOWS_SEND_QUEUE": "lots"})
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "TRIOWS_SEND_QUEUE" in result.stderr


def test_unknown_backend_lists_the_known_ones() -> None:
    result = run_cli("serve", "--backend", "zeromq")
    assert result.returncode != 0
    assert "amqp091" in result.stderr and "memory" in result.stderr


def test_token_command_mints_a_token_the_server_accepts() -> None:
    from triows.auth import verify_token

    secret = "s" * 64
    result = run_cli("token", "Bob", "--ttl", "60", env={**os.environ, "TRIOWS_SECRET": secret})
    assert result.returncode == 0
    assert verify_token(secret, result.stdout.strip()).user == "Bob"


def test_demo_shows_bob_receiving_both_messages() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    assert "demo OK" in result.stdout


def test_every_library_the_packages_import_is_a_declared_dependency() -> None:
    import ast
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {canonical(Requirement(dep).name) for dep in project["dependencies"]}
    distributions = packages_distributions()
    imported = set()
    for path in [*ROOT.glob("triows/*.py"), *ROOT.glob("backends/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"triows", "backends", "__future__"}
    undeclared = {
        module: distributions.get(module)
        for module in third_party
        if not {canonical(name) for name in distributions.get(module, [module])} & declared
    }
    assert not undeclared


def test_a_short_secret_is_refused_at_start_up() -> None:
    result = run_cli("serve", env={**os.environ, "TRIOWS_SECRET": "hunter2"})
    assert result.returncode != 0
    assert "TRIOWS_SECRET must be at least 32 bytes" in result.stderr
