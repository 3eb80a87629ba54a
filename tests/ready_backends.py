"""Backends opened directly (no server) and awaited until they are ready."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from triows.backend import open_backend
from triows.settings import Settings

# A hang guard only; no test asserts on how long something took.
READY_TIMEOUT = 30


@asynccontextmanager
async def open_ready_backend(settings: Settings) -> AsyncIterator[Any]:
    """Open the backend ``settings`` names and wait until it is connected and consuming."""
    async with open_backend(settings) as backend:
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()  # type: ignore[attr-defined]
        yield backend
