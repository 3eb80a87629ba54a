"""The Python client examples of the README and of docs/client.md run as written.

Each runs in a child interpreter against a real ``triows serve``; the only
change made to the code is the server's port (a free one, not 8000), and for
the web app example its file name and uvicorn's port.
"""

from __future__ import annotations

import re
import signal
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

from triows.client import open_events
from triows.process import free_port, serve_instance, wait_for_status

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_URL = "http://127.0.0.1:8000"


def python_block(path: Path, heading: str) -> str:
    """The one ```python block in the section of ``path`` under ``heading``."""
    text = path.read_text()
    assert heading in text, f"{path.name} has no section {heading!r}"
    section = text.split(heading, 1)[1]
    level = heading.split(" ", 1)[0]
    section = re.split(rf"\n{level} ", section, maxsplit=1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert EXAMPLE_URL in code
    return code


def web_app_example() -> str:
    return python_block(ROOT / "docs" / "client.md", "## Sending from an asyncio web app")


async def run_example(code: str) -> list[str]:
    async with serve_instance("memory") as server:
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-c", code.replace(EXAMPLE_URL, server.base_url)],
                capture_stdout=True,
                capture_stderr=True,
            )
    return result.stdout.decode().splitlines()


async def test_the_readme_tour_example_runs_and_prints_the_ack() -> None:
    code = python_block(ROOT / "README.md", "## A five-minute tour")
    lines = await run_example(code)
    assert lines == ["Anne's message was routed", "Anne to Bob: hello from Python"]


async def test_the_client_guide_example_runs_and_prints_what_it_says() -> None:
    code = python_block(ROOT / "docs" / "client.md", "## The Python client")
    lines = await run_example(code)
    assert lines[0].startswith("connected to instance ")
    assert lines[1:] == ["refused: offline", "ack: routed", "Bob: a note to self"]


async def test_the_client_guide_example_runs_under_asyncio_too() -> None:
    code = python_block(ROOT / "docs" / "client.md", "## The Python client")
    assert "trio.run(main)" in code
    lines = await run_example(code.replace("trio.run(main)", "import asyncio\nasyncio.run(main())"))
    assert lines[0].startswith("connected to instance ")
    assert lines[1:] == ["refused: offline", "ack: routed", "Bob: a note to self"]


async def test_the_asyncio_web_app_example_forwards_a_post_to_the_user_on_triows(
    tmp_path: Path,
) -> None:
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        (tmp_path / "notify.py").write_text(web_app_example().replace(EXAMPLE_URL, server.base_url))
        command = [sys.executable, "-m", "uvicorn", "notify:app", "--port", str(port)]
        log = tmp_path / "uvicorn.log"
        async with trio.open_nursery() as nursery:
            with log.open("wb") as log_file:
                app = await nursery.start(
                    partial(
                        trio.run_process,
                        command,
                        cwd=tmp_path,
                        check=False,
                        stdout=log_file,
                        stderr=log_file,
                    )
                )
            try:
                # Up once the route answers; a GET is not allowed on it.
                await wait_for_status(f"{app_url}/notify/Bob", 405)
                async with open_events(server.base_url, user="Bob") as bob:
                    # The body as the guide's curl sends it (form content type).
                    body = {"text": "your order shipped"}
                    answer = await http.post(
                        f"{app_url}/notify/Bob",
                        content=b'{"text": "your order shipped"}',
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    )
                    assert answer.status_code == 202
                    assert answer.json()["status"] == "routed"
                    with trio.fail_after(30):
                        frame = await bob.receive()
                    assert (frame["from"], frame["message"]) == ("notifier", body)
                    assert frame["id"] == answer.json()["id"]
                refused = await http.post(f"{app_url}/notify/Nobody", json=body)
                assert (refused.status_code, refused.json()) == (409, {"error": "offline"})
            finally:
                app.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await app.wait()
        # uvicorn ran the lifespan's exit (the client closed without an error).
        assert "Application shutdown complete" in log.read_text()
