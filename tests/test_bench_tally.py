"""The bench's bookkeeping counts lost, duplicated and out-of-order messages correctly,
and its report shows what a run measured: no column or chart panel for a scenario it did not run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from bench.cpu import ROLES
from bench.report import chart_figure, markdown, write
from bench.tally import Tally, percentile


def _message(stream: int, number: int) -> dict[str, float]:
    return {"s": stream, "n": number, "t": 0.0}


def test_a_confirmed_message_that_never_arrives_is_lost() -> None:
    tally = Tally()
    tally.confirm(0, 0)
    tally.confirm(0, 1)
    tally.arrive(0, _message(0, 0))
    summary = tally.summary()
    assert (summary["delivered"], summary["lost"]) == (1, 1)
    assert not tally.all_arrived


def test_a_message_arriving_before_its_confirmation_is_delivered() -> None:
    tally = Tally()
    tally.arrive(0, _message(3, 7))
    tally.confirm(3, 7)
    assert tally.all_arrived
    assert tally.summary()["lost"] == 0


def test_a_second_arrival_is_a_duplicate() -> None:
    tally = Tally()
    tally.confirm(0, 0)
    tally.arrive(0, _message(0, 0))
    tally.arrive(0, _message(0, 0))
    assert tally.summary()["duplicated"] == 1


def test_order_is_checked_per_stream_and_receiver() -> None:
    tally = Tally()
    for number in (0, 1, 2):
        tally.confirm(0, number)
        tally.confirm(1, number)
    # Streams interleave freely; only a stream going backwards at one receiver counts.
    for stream, number in ((0, 0), (1, 0), (0, 2), (1, 1), (0, 1), (1, 2)):
        tally.arrive(0, _message(stream, number))
    assert tally.summary()["out_of_order"] == 1


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(value) for value in range(1, 101)]
    assert (percentile(ordered, 0.5), percentile(ordered, 0.99), percentile(ordered, 1.0)) == (
        50.0,
        99.0,
        100.0,
    )


def test_a_room_message_is_complete_once_every_member_got_it_once() -> None:
    tally = Tally(fanout=3)
    tally.confirm(0, 0)
    tally.confirm(0, 1)
    for receiver in (0, 1, 2):
        tally.arrive(receiver, _message(0, 0))
    tally.arrive(0, _message(0, 1))
    tally.arrive(0, _message(0, 1))  # a second copy at the same member
    tally.arrive(1, _message(0, 1))
    assert not tally.all_arrived
    summary = tally.summary()
    # Deliveries: 3 of message 0, 2 of message 1 (one member never got it).
    assert (summary["delivered"], summary["lost"], summary["duplicated"]) == (5, 1, 1)
    # Fan-out latency: one per complete message.
    assert len(tally.latencies) == 1
    tally.arrive(2, _message(0, 1))
    assert tally.all_arrived and len(tally.latencies) == 2


def _result(*cells: tuple[str, str]) -> dict[str, Any]:
    """A run's result with one successful row per (target, scenario) of ``cells``."""
    rows = []
    for number, (target, scenario) in enumerate(cells, start=1):
        rows.append(
            {
                "target": target,
                "scenario": scenario,
                "status": "ok",
                "msg_per_s": 100.0 * number,
                "latency_ms": {"p50": 1.0 * number, "p99": 2.0 * number, "max": 3.0 * number},
                "lost": 0,
                "duplicated": 0,
                "out_of_order": 0,
                "loadgen_saturated": False,
                "loadgen_cpu_share": 0.5,
                "other_cpu_cores": 0.1,
                "cpu_per_1000": dict.fromkeys(ROLES, 0.25),
                "params": {"rate": 50},
                "server_cpu_ms_per_message": 0.5,
                "rss_kib_per_connection": 25.0,
                "idle_cpu_percent": 0.1,
            }
        )
    return {
        "started": "2026-12-06 12:00:00 UTC",
        "quick": True,
        "run_seconds": 10.0,
        "machine": {"cpu_model": "test", "logical_cores": 2},
        "command": "python -m bench direct-ws --quick",
        "rows": rows,
    }


def _main_table(result: dict[str, Any]) -> list[str]:
    return [line for line in markdown(result).splitlines() if line.startswith("| target | ")]


def test_a_partial_run_shows_only_the_columns_of_the_scenarios_it_ran() -> None:
    result = _result(("amqp091-rabbitmq", "direct-ws"), ("stomp-rabbitmq", "direct-ws"))
    text = markdown(result)
    (header,) = _main_table(result)[:1]
    assert header == "| target | direct-ws msg/s | lost/dup/out-of-order |"
    assert "not run" not in text
    assert "| amqp091-rabbitmq | 100 | 0/0/0 |" in text


def test_a_target_without_a_scenario_the_others_ran_still_says_not_run() -> None:
    result = _result(("amqp091-rabbitmq", "direct"), ("amqp091-rabbitmq", "latency"))
    result["rows"] += _result(("stomp-rabbitmq", "latency"))["rows"]
    header = _main_table(result)[0]
    assert "ceiling" not in header and "idle" not in header and "direct-ws" not in header
    assert "(direct · latency)" in header
    assert "| stomp-rabbitmq | not run | not run | " in markdown(result)


def _bars(axes: Axes) -> list[float]:
    return [patch.get_height() for patch in axes.patches if isinstance(patch, Rectangle)]


@pytest.mark.parametrize(
    ("scenarios", "panels"),
    [
        (("direct-ws",), 1),  # throughput only: no latency and no CPU panel
        (("latency",), 1),  # latency only
        (("direct", "idle"), 2),  # throughput and CPU of direct; idle is not drawn
        (("direct", "direct-ws", "latency", "ceiling"), 3),
    ],
)
def test_the_chart_draws_only_panels_with_data(scenarios: tuple[str, ...], panels: int) -> None:
    result = _result(*((target, s) for target in ("a", "b") for s in scenarios))
    figure = chart_figure(result)
    assert figure is not None
    try:
        assert len(figure.axes) == panels
        for axes in figure.axes:
            assert any(height > 0 for height in _bars(axes)), axes.get_title()
    finally:
        plt.close(figure)


def test_a_run_with_nothing_to_chart_writes_no_png(tmp_path: Path) -> None:
    result = _result(("a", "idle"))
    paths = write(result, tmp_path, "idle-only")
    assert [path.name for path in paths] == ["idle-only.json", "idle-only.md"]
    assert not (tmp_path / "idle-only.png").exists()
