"""The benchmark suite works: its quick matrix runs every scenario on every broker, and the peer.

CI runs this once to prove the bench works; the figures it produces are not
results (``bench/README.md``). What is pinned down: every row is a result,
not an error, and no message is lost, duplicated or reordered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.brokers import BROKER_NAMES, require_broker

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
# A hang guard only: the quick matrix takes about two minutes on two cores.
QUICK_MATRIX_TIMEOUT = 900


async def test_quick_matrix_runs_every_scenario_on_every_broker_without_loss(
    tmp_path: Path,
) -> None:
    for name in BROKER_NAMES:
        await require_broker(name)
    with trio.fail_after(QUICK_MATRIX_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "bench", "--matrix", "--quick", "--out", str(tmp_path)],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    log = result.stderr.decode(errors="replace")[-4000:]
    assert result.returncode == 0, log
    run = json.loads((tmp_path / "quick-matrix.json").read_text())
    assert (tmp_path / "quick-matrix.md").read_text().startswith("Run ")
    assert (tmp_path / "quick-matrix.png").stat().st_size > 0
    cells = {(row["target"], row["scenario"]) for row in run["rows"]}
    # Six triows targets and the peer, five scenarios each.
    assert len(cells) == 7 * 5, log
    # The peer has no backend of triows' to take a ceiling of.
    not_ok = {(row["target"], row["scenario"], row["status"]) for row in run["rows"]}
    not_ok = {cell for cell in not_ok if cell[2] != "ok"}
    assert not_ok == {("peer-socketio", "ceiling", "n/a")}
    for row in run["rows"]:
        if row["status"] == "ok" and row["scenario"] != "idle":
            assert (row["lost"], row["duplicated"], row["out_of_order"]) == (0, 0, 0), row
            assert row["delivered"] > 0, row


def test_bench_refuses_an_unknown_scenario() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "nonsense"], cwd=ROOT, capture_output=True, check=False
    )
    assert result.returncode == 2
    assert b"unknown scenario 'nonsense'" in result.stderr
