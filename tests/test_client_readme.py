"""The README's ``open_client`` example runs as written against a real ``triows serve``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

from triows.process import serve_instance

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLE_URL = "http://127.0.0.1:8000"


def readme_example() -> str:
    section = README.read_text().split("## The Python client", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert EXAMPLE_URL in code
    return code


async def test_the_readme_client_example_runs_and_prints_what_it_says() -> None:
    async with serve_instance("memory") as server:
        # The example's one change: the server's port is a free one, not 8000.
        code = readme_example().replace(EXAMPLE_URL, server.base_url)
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True
            )
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("connected to instance ")
    assert lines[1:] == ["refused: offline", "ack: routed", "Bob: a note to self"]
