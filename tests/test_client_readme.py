"""The Python client examples of the README and of docs/client.md run as written.

Each runs in a child interpreter against a real ``triows serve``; the only
change made to the code is the server's port (a free one, not 8000).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from triows.process import serve_instance

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
