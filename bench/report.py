"""A run's result file (JSON), its Markdown tables and its PNG chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot's import
import matplotlib.pyplot as plt

from bench.cpu import ROLES

Rows = Sequence[dict[str, Any]]


def _find(rows: Rows, target: str, scenario: str) -> dict[str, Any] | None:
    for row in rows:
        if row["target"] == target and row["scenario"] == scenario:
            return row
    return None


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cell(row: dict[str, Any] | None, render: Any) -> str:
    if row is None:
        return "not run"
    if not _ok(row):
        return "**error**"
    text: str = render(row)
    return text


def _targets(rows: Rows) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row["target"], None)
    return list(seen)


def _losses(row: dict[str, Any]) -> str:
    return f"{row['lost']}/{row['duplicated']}/{row['out_of_order']}"


def _percent_of_ceiling(direct: dict[str, Any] | None, ceiling: dict[str, Any] | None) -> str:
    if not (_ok(direct) and _ok(ceiling)) or not ceiling or not ceiling["msg_per_s"]:
        return "-"
    assert direct is not None
    return f"{100 * direct['msg_per_s'] / ceiling['msg_per_s']:.0f} %"


def markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: the matrix, CPU per 1,000 messages, and every error."""
    rows: Rows = result["rows"]
    lines = [
        f"Run {result['started']} ({'quick' if result['quick'] else 'full'}), "
        f"{result['run_seconds']:.0f} s, on {result['machine']['cpu_model']} "
        f"with {result['machine']['logical_cores']} logical cores: load generator, instances "
        "and broker share them. Command: `" + result["command"] + "`",
        "",
        "| target | direct msg/s | direct p50 / p99 ms | direct-ws msg/s | latency @ msg/s "
        "| latency p50 / p99 / max ms | lost/dup/out-of-order (direct · ws · latency) "
        "| idle KiB/conn | idle CPU % | ceiling msg/s | direct % of ceiling |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for target in _targets(rows):
        direct = _find(rows, target, "direct")
        websocket = _find(rows, target, "direct-ws")
        latency = _find(rows, target, "latency")
        idle = _find(rows, target, "idle")
        ceiling = _find(rows, target, "ceiling")
        losses = " · ".join(
            _cell(row, _losses) for row in (direct, websocket, latency) if row is not None
        )
        saturated = " ⚠" if _ok(direct) and direct and direct["loadgen_saturated"] else ""
        cells = [
            target,
            _cell(direct, lambda r, mark=saturated: _number(r["msg_per_s"]) + mark),
            _cell(
                direct,
                lambda r: (
                    f"{_number(r['latency_ms'].get('p50'), 1)} / "
                    f"{_number(r['latency_ms'].get('p99'), 1)}"
                ),
            ),
            _cell(websocket, lambda r: _number(r["msg_per_s"])),
            _cell(latency, lambda r: _number(r["params"].get("rate"))),
            _cell(
                latency,
                lambda r: " / ".join(
                    _number(r["latency_ms"].get(name), 1) for name in ("p50", "p99", "max")
                ),
            ),
            losses or "not run",
            _cell(idle, lambda r: _number(r["rss_kib_per_connection"], 1)),
            _cell(idle, lambda r: _number(r["idle_cpu_percent"], 1)),
            _cell(ceiling, lambda r: _number(r["msg_per_s"])),
            _percent_of_ceiling(direct, ceiling),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "⚠ = the load generator used at least 90 % of a core: it, not the server, may be "
        "the bottleneck. *other processes*: CPU that everything outside this run used "
        f"meanwhile (of {result['machine']['logical_cores']} cores), i.e. how noisy the "
        "machine was.",
        "",
        "CPU seconds per 1,000 delivered messages (from the OS, user + system):",
        "",
        "| target | scenario | instance A | instance B | broker | load generator "
        "| load generator CPU | other processes |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        if not _ok(row) or "cpu_per_1000" not in row:
            continue
        per = row["cpu_per_1000"]
        lines.append(
            f"| {row['target']} | {row['scenario']} | "
            + " | ".join(_number(per.get(role), 3) for role in ROLES)
            + f" | {100 * row['loadgen_cpu_share']:.0f} % of a core"
            + (" ⚠" if row["loadgen_saturated"] else "")
            + f" | {_number(row.get('other_cpu_cores'), 2)} cores |"
        )
    errors = [row for row in rows if not _ok(row)]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {row['target']} / {row['scenario']}: {row['error']}" for row in errors]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    """Throughput, latency and CPU per 1,000 messages per target, as one PNG."""
    rows: Rows = result["rows"]
    targets = _targets(rows)
    figure, (throughput, latency, cpu) = plt.subplots(1, 3, figsize=(18, 6))
    width = 0.27
    positions = range(len(targets))

    def values(scenario: str, pick: Any) -> list[float]:
        picked = []
        for target in targets:
            row = _find(rows, target, scenario)
            picked.append(pick(row) if _ok(row) else 0.0)
        return picked

    for offset, scenario in enumerate(("direct", "direct-ws", "ceiling")):
        throughput.bar(
            [p + (offset - 1) * width for p in positions],
            values(scenario, lambda r: r["msg_per_s"]),
            width,
            label=scenario,
        )
    throughput.set_yscale("log")
    throughput.set_title("delivered msg/s (log scale; 0 = error or not run)")
    for offset, name in enumerate(("p50", "p99")):
        latency.bar(
            [p + (offset - 0.5) * width for p in positions],
            values("latency", lambda r, name=name: r["latency_ms"].get(name, 0.0)),
            width,
            label=f"latency {name}",
        )
    latency.set_title("latency scenario, ms (send -> WebSocket receipt)")
    bottom = [0.0] * len(targets)
    for role in ROLES:
        heights = values("direct", lambda r, role=role: r["cpu_per_1000"].get(role) or 0.0)
        cpu.bar(list(positions), heights, 0.6, bottom=bottom, label=role)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    cpu.set_title("direct: CPU seconds per 1,000 messages")
    for axes in (throughput, latency, cpu):
        axes.set_xticks(list(positions))
        axes.set_xticklabels(targets, rotation=30, ha="right")
        axes.legend()
    figure.suptitle(
        f"triows bench {result['started']} · {result['machine']['cpu_model']} · "
        f"{result['machine']['logical_cores']} cores shared by load generator, instances, broker"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(result: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    """Write ``STEM.json``, ``STEM.md`` and ``STEM.png`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path = directory / f"{stem}.md"
    md_path.write_text(markdown(result), encoding="utf-8")
    png_path = directory / f"{stem}.png"
    chart(result, png_path)
    return [json_path, md_path, png_path]
