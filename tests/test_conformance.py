"""Autobahn's WebSocket cases (run by kosoku) against a real ``triows serve``, via ``/_echo``.

``/_echo`` runs on the same lean WebSocket path as ``/events`` and exists only
with ``TRIOWS_TEST_ECHO=1``. Excluded: 12.* and 13.* (permessage-deflate, which
triows declines) and 9.* (messages of 256 KiB to 16 MiB, over the frame limit
by design: they are closed with 1009).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from triows.process import serve_instance

EXCLUDED = ("12.*", "13.*", "9.*")


async def test_autobahn_quick_set_passes_against_the_echo_route(tmp_path: Path) -> None:
    kosoku = shutil.which("kosoku") or str(Path(sys.executable).parent / "kosoku")
    async with serve_instance("memory", env={"TRIOWS_TEST_ECHO": "1"}) as server:
        address = server.base_url.replace("http://", "ws://") + "/_echo"
        excludes = [arg for case in EXCLUDED for arg in ("-x", case)]
        with trio.fail_after(300):
            result = await trio.run_process(
                [kosoku, *excludes, "-o", str(tmp_path), address],
                capture_stdout=True,
                stderr=subprocess.STDOUT,
                check=False,
            )
    output = result.stdout.decode()
    assert result.returncode == 0, output[-3000:]
    assert "cases passed" in output


async def test_the_echo_route_does_not_exist_without_the_test_setting() -> None:
    async with serve_instance("memory") as server:
        address = server.base_url.replace("http://", "ws://") + "/_echo"
        with pytest.raises(HandshakeError):
            async with open_websocket_url(address):
                pass
