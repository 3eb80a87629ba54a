"""Shared fixtures: triows apps on the memory backend behind Quart's test client."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
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


@pytest.fixture
def exchange() -> str:
    """A fresh exchange name, so that tests sharing a broker never see each other's messages."""
    return f"triows-test-{secrets.token_hex(4)}"


@pytest.fixture
async def client() -> AsyncIterator[QuartClient]:
    """A dev-mode app on the memory backend."""
    async with serving() as test_client:
        yield test_client
