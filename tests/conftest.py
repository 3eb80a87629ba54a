"""Shared fixtures (triows apps on the memory backend behind Quart's test client),
and the ``broker`` and ``server`` markers, added by what a test module uses.

``python3 -m nox -s unit`` runs ``-m "not broker and not server"``: the tests
that need neither a broker nor a child process. Rather than trust every test
to be marked by hand, a module is marked by the helpers it imports:

- ``broker``: anything from ``tests.brokers`` (``require_broker``,
  ``broker_outage``, ...), the tests' only way to a real broker;
- ``server``: anything from ``triows.process`` (runs ``triows serve`` as a
  child), ``tests.e2e`` (instances on a broker) or ``open_cluster``.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from quart.typing import TestClientProtocol as QuartClient

from triows.app import create_app
from triows.settings import Settings


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[QuartClient]:
    """A test client of an app whose lifespan runs for the block (memory backend by default)."""
    app = create_app(Settings(**settings))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def close_normally(websocket: Any) -> None:
    """Close a test client's WebSocket with 1000, as a client that is done would.

    Quart-trio's own ``close()`` sends ``websocket.close`` to the app (and the
    type ``int`` as its code); a client's close reaches an ASGI app as
    ``websocket.disconnect`` with the client's code.
    """
    await websocket._server_send.send({"type": "websocket.disconnect", "code": 1000})


@pytest.fixture
def exchange() -> str:
    """A fresh exchange name, so that tests sharing a broker never see each other's messages."""
    return f"triows-test-{secrets.token_hex(4)}"


class _EventLines(logging.Handler):
    """Writes each ``triows`` event, with its fields, as one line to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        fields = json.dumps(getattr(record, "fields", {}), default=str)
        stamp = time.strftime("%H:%M:%S", time.gmtime(record.created))
        sys.stderr.write(
            f"{stamp}.{int(record.msecs):03d} {record.levelname} {record.getMessage()} {fields}\n"
        )


@pytest.fixture
def broker_events() -> Iterator[None]:
    """Every ``triows`` event of the test (INFO and up, with its fields) on stderr.

    pytest shows a failed test's stderr, so a broker test that fails says what
    the backend saw (connections lost, bindings deferred, reconnects) and when.
    """
    logger = logging.getLogger("triows")
    handler = _EventLines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def client() -> AsyncIterator[QuartClient]:
    """A dev-mode app on the memory backend."""
    async with serving() as test_client:
        yield test_client


BROKER_MODULES = frozenset({"tests.brokers"})
SERVER_MODULES = frozenset({"triows.process", "tests.e2e"})
SERVER_NAMES = frozenset({"open_cluster"})


def _uses(module: types.ModuleType) -> tuple[bool, bool]:
    """Whether ``module`` imports a broker helper, and whether it starts server processes."""
    broker = server = False
    for name, value in vars(module).items():
        if isinstance(value, types.ModuleType):
            origin = value.__name__
        else:
            origin = getattr(value, "__module__", None) or ""
        broker = broker or origin in BROKER_MODULES
        server = server or origin in SERVER_MODULES or name in SERVER_NAMES
    return broker, server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[str, tuple[bool, bool]] = {}
    for item in items:
        module = item.getparent(pytest.Module)
        if module is None:
            continue
        if module.nodeid not in seen:
            seen[module.nodeid] = _uses(module.obj)
        broker, server = seen[module.nodeid]
        if broker:
            item.add_marker(pytest.mark.broker)
        if server:
            item.add_marker(pytest.mark.server)
