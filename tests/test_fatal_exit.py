"""A backend or router task that dies ends the instance with a non-zero exit (real processes).

A live process that cannot route would answer every ``/send`` with a 500
while ``/healthz`` stays 200; the orchestrator restarts one that exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.dying_backend import END_INCOMING_KEY, KILL_TASK_KEY
from triows.app import FATAL_EXIT_CODE
from triows.client import post_send
from triows.process import free_port, stop_process, wait_for_status

ROOT = Path(__file__).resolve().parent.parent
EXIT_TIMEOUT = 30
# The test-only backend is registered inside the child process only.
SERVE_WITH_DYING_BACKEND = (
    "import sys, triows.backend as b; "
    "b.BUILTIN_BACKENDS['dying'] = 'tests.dying_backend:open_dying_backend'; "
    "from triows.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize("key", [KILL_TASK_KEY, END_INCOMING_KEY], ids=["backend-task", "pump"])
async def test_a_dead_backend_or_router_task_ends_triows_serve_non_zero(
    key: str, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    stderr_path = tmp_path / "stderr"
    command = [sys.executable, "-c", SERVE_WITH_DYING_BACKEND, "serve", "--bind"]
    command += [f"127.0.0.1:{port}", "--backend", "dying"]
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(command, cwd=ROOT, stderr=stderr)
    try:
        await wait_for_status(f"{base_url}/readyz", 200)
        async with httpx.AsyncClient() as http:
            await post_send(http, base_url, key.removeprefix("user."), "die", sender="Anne")
        with trio.fail_after(EXIT_TIMEOUT):
            await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process)
    assert process.returncode == FATAL_EXIT_CODE
    events = [json.loads(line) for line in stderr_path.read_text().splitlines() if line]
    fatal = [event for event in events if event.get("event") == "fatal"]
    assert len(fatal) == 1, events
