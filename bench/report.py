"""A run's result file (JSON), its Markdown tables and its PNG chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot's import
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

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
    if row.get("status") == "n/a":
        return "n/a"
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


# The scenarios of the main table (the others have tables of their own).
MAIN_SCENARIOS = ("direct", "direct-ws", "latency", "idle", "ceiling")
PEER = "peer-socketio"


def _is_peer(target: str) -> bool:
    return target.startswith("peer-")


def _server_cpu(row: dict[str, Any]) -> str:
    return _number(row.get("server_cpu_ms_per_message"), 3)


def _server_ms(row: dict[str, Any]) -> float | None:
    value: float | None = row.get("server_cpu_ms_per_message")
    return value


def _instance_cpus(row: dict[str, Any]) -> str:
    return ", ".join(_number(value) for value in row["instance_cpu_percent"].values())


def _ratio(ours: float | None, theirs: float | None, digits: int = 2) -> str:
    if not ours or not theirs:
        return "-"
    return f"{ours / theirs:.{digits}f}x"


# How each scenario's senders reach the peer, for the heading of its comparison.
PEER_PATHS = {
    "direct": "`POST /send` to both",
    "direct-ws": "triows' `send` frame against python-socketio's `send` event with an "
    "acknowledgement",
}


def _vs_peer(rows: Rows, scenario: str) -> list[str]:
    """triows and the peer side by side in ``scenario``, with triows / peer ratios."""
    peer = _find(rows, PEER, scenario)
    ours = [t for t in _targets(rows) if not _is_peer(t) and _find(rows, t, scenario)]
    if peer is None or not ours:
        return []
    lines = [
        "",
        f"`{scenario}` against the peer (python-socketio + aio-pika on uvicorn), same run; "
        f"{PEER_PATHS[scenario]}:",
        "",
        f"| target | {scenario} msg/s | server CPU ms per delivered message (all instances) "
        "| lost/dup/out-of-order |",
        "|---|--:|--:|--:|",
    ]
    for target in [*ours, PEER]:
        row = _find(rows, target, scenario)
        lines.append(
            f"| {target} | {_cell(row, lambda r: _number(r['msg_per_s']))} "
            f"| {_cell(row, _server_cpu)} | {_cell(row, _losses)} |"
        )
    for target in ours:
        row = _find(rows, target, scenario)
        if _ok(row) and _ok(peer):
            assert row is not None and peer is not None
            lines.append(
                f"| **{target} / peer** | {_ratio(row['msg_per_s'], peer['msg_per_s'])} "
                f"| {_ratio(_server_ms(row), _server_ms(peer))} "
                "| |"
            )
    lines += ["", "msg/s ratio > 1: triows faster; CPU ratio < 1: triows lighter."]
    return lines


def _presence(rows: Rows) -> list[str]:
    found = [row for row in rows if row["scenario"] == "presence"]
    if not found:
        return []
    lines = [
        "",
        "`presence`: idle users spread over the instances, each in one room; "
        "`GET /presence?user=` and `?room=` in turn at a steady rate over the instances "
        "(`TRIOWS_PRESENCE_RATE` raised for the bench); CPU per query is the instances' "
        "(and the broker's) CPU in the query window less theirs idle over as long:",
        "",
        "| target | instances | users | rooms of members | asked/s | queries/s "
        "| p50 / p99 ms | complete | wrong | server CPU ms/query | broker CPU ms/query "
        "| idle instances CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in found:
        if not _ok(row):
            lines.append(f"| {row['target']} | {row['instances']} | {_cell(row, str)} |")
            continue
        latency = row["latency_ms"]
        lines.append(
            f"| {row['target']} | {row['instances']} | {_number(row['users'])} "
            f"| {_number(row['rooms'])} of {_number(row['room_size'])} "
            f"| {_number(row['params']['query_rate'])} | {_number(row['queries_per_s'])} "
            f"| {_number(latency.get('p50'), 1)} / {_number(latency.get('p99'), 1)} "
            f"| {_number(100 * (row['complete_fraction'] or 0), 1)} % | {row['wrong']} "
            f"| {_number(row['server_cpu_ms_per_query'], 3)} "
            f"| {_number(row['broker_cpu_ms_per_query'], 3)} "
            f"| {_number(row['idle_instances_cpu_percent'], 1)} |"
        )
    return lines


# A target run with --presence-events E is named TARGET:eventsE.
EVENTS_SUFFIX = ":events"


def _presence_events(rows: Rows) -> list[str]:
    """``room`` and ``room-churn`` with presence events off (0) and on (1), with on / off."""
    variants: dict[str, dict[str, str]] = {}
    for name in _targets(rows):
        base, found, events = name.partition(EVENTS_SUFFIX)
        if found:
            variants.setdefault(base, {})[events] = name
    if not variants:
        return []
    lines = [
        "",
        "Presence events off (`TRIOWS_PRESENCE_EVENTS=0`) and on, same run: `room` and "
        "`room-churn` (members with `?presence=1`, two more users joining and leaving "
        "the room) deliveries/s and server CPU:",
        "",
        "| target | events | scenario | deliveries/s | server CPU ms/delivery "
        "| server CPU cores | join+leave cycles/s | presence events to members |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for base, by_events in variants.items():
        for scenario in ("room", "room-churn"):
            for events, name in by_events.items():
                row = _find(rows, name, scenario)
                if row is None:
                    continue
                lines.append(
                    f"| {base} | {events} | {scenario} "
                    f"| {_cell(row, lambda r: _number(r['msg_per_s']))} "
                    f"| {_cell(row, _server_cpu)} "
                    f"| {_cell(row, lambda r: _number(r.get('server_cpu_cores'), 2))} "
                    f"| {_cell(row, lambda r: _number(r.get('churn_cycles_per_s'), 1))} "
                    f"| {_cell(row, lambda r: _number(r.get('presence_events')))} |"
                )
            on, off = (
                _find(rows, by_events.get("1", ""), scenario),
                _find(rows, by_events.get("0", ""), scenario),
            )
            if _ok(on) and _ok(off):
                assert on is not None and off is not None
                lines.append(
                    f"| **{base} 1 / 0** | | {scenario} "
                    f"| {_ratio(on['msg_per_s'], off['msg_per_s'])} "
                    f"| {_ratio(_server_ms(on), _server_ms(off))} "
                    f"| {_ratio(on.get('server_cpu_cores'), off.get('server_cpu_cores'))} | | |"
                )
    return lines


def _room(rows: Rows) -> list[str]:
    found = [row for row in rows if row["scenario"] == "room" and _ok(row)]
    if not found:
        return []
    lines = [
        "",
        "`room`: one sender `POST`s to a room on A whose members are spread over A and B; "
        "msg/s counts deliveries (one per member), latency is send to the last member:",
        "",
        "| target | members | deliveries/s | fan-out p50 ms | fan-out p99 ms "
        "| server CPU ms/delivery | lost/dup/out-of-order |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in found:
        lines.append(
            f"| {row['target']} | {row['params']['members']} | {_number(row['msg_per_s'])} "
            f"| {row['latency_ms'].get('p50')} | {row['latency_ms'].get('p99')} "
            f"| {_server_cpu(row)} | {_losses(row)} |"
        )
    return lines


def _batch(rows: Rows) -> list[str]:
    targets = [t for t in _targets(rows) if _find(rows, t, "batch")]
    if not targets:
        return []
    lines = [
        "",
        "`batch`: JSON arrays to `POST /send`, against single POSTs (`direct`) in the same run:",
        "",
        "| target | direct msg/s | batch msg/s | batch size | batch / direct "
        "| batch server CPU ms/msg | batch lost/dup/out-of-order |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for target in targets:
        direct, batch = _find(rows, target, "direct"), _find(rows, target, "batch")
        ratio = "-"
        if _ok(direct) and _ok(batch):
            assert direct is not None and batch is not None
            ratio = _ratio(batch["msg_per_s"], direct["msg_per_s"])
        lines.append(
            f"| {target} | {_cell(direct, lambda r: _number(r['msg_per_s']))} "
            f"| {_cell(batch, lambda r: _number(r['msg_per_s']))} "
            f"| {_cell(batch, lambda r: str(r['params']['batch_size']))} | {ratio} "
            f"| {_cell(batch, _server_cpu)} | {_cell(batch, _losses)} |"
        )
    return lines


def _scaleout_rows(rows: Rows) -> list[dict[str, Any]]:
    return [row for row in rows if row["scenario"] == "scaleout" and "instances" in row]


def _scaleout(rows: Rows) -> list[str]:
    scaleout = _scaleout_rows(rows)
    if not scaleout:
        return []
    lines = [
        "",
        "`scaleout`: senders on the first instance, receivers on the second, the others "
        "running without users:",
        "",
        "| target | instances | delivered msg/s | CPU % of a core per instance (A, B, idle ...) "
        "| server CPU ms per delivered message (all instances) | lost/dup/out-of-order |",
        "|---|--:|--:|--|--:|--:|",
    ]
    for row in scaleout:
        lines.append(
            f"| {row['target']} | {row['instances']} "
            f"| {_cell(row, lambda r: _number(r['msg_per_s']))} "
            f"| {_cell(row, _instance_cpus)} "
            f"| {_cell(row, _server_cpu)} | {_cell(row, _losses)} |"
        )
    peer = {row["instances"]: row for row in scaleout if _is_peer(row["target"]) and _ok(row)}
    for row in scaleout:
        theirs = peer.get(row["instances"])
        if _is_peer(row["target"]) or not _ok(row) or theirs is None:
            continue
        lines.append(
            f"| **{row['target']} / peer** | {row['instances']} "
            f"| {_ratio(row['msg_per_s'], theirs['msg_per_s'])} | "
            f"| {_ratio(row['server_cpu_ms_per_message'], theirs['server_cpu_ms_per_message'])} "
            "| |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The run as Markdown: the matrix, CPU per 1,000 messages, and every error."""
    rows: Rows = result["rows"]
    lines = [
        f"Run {result['started']} ({'quick' if result['quick'] else 'full'}), "
        f"{result['run_seconds']:.0f} s, on {result['machine']['cpu_model']} "
        f"with {result['machine']['logical_cores']} logical cores: load generator, instances "
        "and broker share them. Command: `" + result["command"] + "`",
    ]
    if any(row["scenario"] in MAIN_SCENARIOS for row in rows):
        lines += _main_table(rows)
    lines += _vs_peer(rows, "direct") + _vs_peer(rows, "direct-ws")
    lines += _batch(rows) + _scaleout(rows) + _room(rows) + _sessions(rows)
    lines += _presence(rows) + _presence_events(rows)
    if not any(_ok(row) and "cpu_per_1000" in row for row in rows):
        return "\n".join(lines + _errors(rows)) + "\n"
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
        scenario = row["scenario"]
        if "instances" in row:
            scenario += f", {row['instances']} instances"
        lines.append(
            f"| {row['target']} | {scenario} | "
            + " | ".join(_number(per.get(role), 3) for role in ROLES)
            + f" | {100 * row['loadgen_cpu_share']:.0f} % of a core"
            + (" ⚠" if row["loadgen_saturated"] else "")
            + f" | {_number(row.get('other_cpu_cores'), 2)} cores |"
        )
    return "\n".join(lines + _errors(rows)) + "\n"


def _errors(rows: Rows) -> list[str]:
    errors = [row for row in rows if not _ok(row) and row.get("status") != "n/a"]
    if not errors:
        return []
    lines = ["", "Errors:", ""]
    return lines + [f"- {row['target']} / {row['scenario']}: {row['error']}" for row in errors]


# A target run with --resume-window W is named TARGET:resumeW.
RESUME_SUFFIX = ":resume"


def _sessions(rows: Rows) -> list[str]:
    """Each target with sessions off (window 0) and on, side by side, with on / off ratios."""
    variants: dict[str, dict[str, str]] = {}
    for name in _targets(rows):
        base, found, window = name.partition(RESUME_SUFFIX)
        if found:
            variants.setdefault(base, {})[window] = name
    if not variants:
        return []
    lines = [
        "",
        "Sessions off (`TRIOWS_RESUME_WINDOW=0`) and on, same run: `direct` msg/s and server "
        "CPU per message, RSS per idle connection on the instance, the broker's memory "
        "(`erlang:memory(total)`, a shared node) grown per idle connection and the session "
        "queues it held with what each queue's process uses (`list_queues memory`), "
        "`room` deliveries/s:",
        "",
        "| target | window s | direct msg/s | server CPU ms/msg | idle KiB/conn "
        "| broker KiB/idle conn | session queues | KiB per session queue | room deliveries/s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for base, by_window in variants.items():
        for window, name in by_window.items():
            direct, idle, room = (_find(rows, name, s) for s in ("direct", "idle", "room"))
            lines.append(
                f"| {base} | {window} "
                f"| {_cell(direct, lambda r: _number(r['msg_per_s']))} "
                f"| {_cell(direct, lambda r: _number(_server_ms(r), 3))} "
                f"| {_cell(idle, lambda r: _number(r['rss_kib_per_connection'], 1))} "
                f"| {_cell(idle, lambda r: _number(r.get('broker_kib_per_connection'), 1))} "
                f"| {_cell(idle, lambda r: _number(r.get('session_queues')))} "
                f"| {_cell(idle, lambda r: _number(r.get('broker_queue_kib_per_session'), 1))} "
                f"| {_cell(room, lambda r: _number(r['msg_per_s']))} |"
            )
        off = by_window.get("0")
        for window, name in by_window.items():
            if off is None or name == off:
                continue
            on_direct, off_direct = _find(rows, name, "direct"), _find(rows, off, "direct")
            on_room, off_room = _find(rows, name, "room"), _find(rows, off, "room")
            on_idle, off_idle = _find(rows, name, "idle"), _find(rows, off, "idle")
            direct_ok = _ok(on_direct) and _ok(off_direct)
            idle_ok = _ok(on_idle) and _ok(off_idle)
            room_ok = _ok(on_room) and _ok(off_room)
            cells = [
                f"**{base} {window} / 0**",
                "",
                _ratio(on_direct["msg_per_s"], off_direct["msg_per_s"]) if direct_ok else "-",
                _ratio(_server_ms(on_direct), _server_ms(off_direct)) if direct_ok else "-",
                _ratio(on_idle["rss_kib_per_connection"], off_idle["rss_kib_per_connection"])
                if idle_ok
                else "-",
                "",
                "",
                "",
                _ratio(on_room["msg_per_s"], off_room["msg_per_s"]) if room_ok else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# The main table's columns: header, the scenarios that must all have run for the
# column to be shown, and its cell from a target's row of each scenario that ran. So a
# run of some scenarios (``bench direct-ws``) has no column that would say "not run".
Found = dict[str, dict[str, Any] | None]
LOSSES = "lost/dup/out-of-order"
COUNTED_SCENARIOS = ("direct", "direct-ws", "latency")
MAIN_COLUMNS: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    (
        "direct msg/s",
        ("direct",),
        lambda found: _cell(
            found["direct"],
            lambda r: _number(r["msg_per_s"]) + (" ⚠" if r["loadgen_saturated"] else ""),
        ),
    ),
    (
        "direct p50 / p99 ms",
        ("direct",),
        lambda found: _cell(
            found["direct"],
            lambda r: (
                f"{_number(r['latency_ms'].get('p50'), 1)} / "
                f"{_number(r['latency_ms'].get('p99'), 1)}"
            ),
        ),
    ),
    (
        "direct-ws msg/s",
        ("direct-ws",),
        lambda found: _cell(found["direct-ws"], lambda r: _number(r["msg_per_s"])),
    ),
    (
        "latency @ msg/s",
        ("latency",),
        lambda found: _cell(found["latency"], lambda r: _number(r["params"].get("rate"))),
    ),
    (
        "latency p50 / p99 / max ms",
        ("latency",),
        lambda found: _cell(
            found["latency"],
            lambda r: " / ".join(
                _number(r["latency_ms"].get(name), 1) for name in ("p50", "p99", "max")
            ),
        ),
    ),
    (LOSSES, (), None),  # shown if one of COUNTED_SCENARIOS ran
    (
        "idle KiB/conn",
        ("idle",),
        lambda found: _cell(found["idle"], lambda r: _number(r["rss_kib_per_connection"], 1)),
    ),
    (
        "idle CPU %",
        ("idle",),
        lambda found: _cell(found["idle"], lambda r: _number(r["idle_cpu_percent"], 1)),
    ),
    (
        "ceiling msg/s",
        ("ceiling",),
        lambda found: _cell(found["ceiling"], lambda r: _number(r["msg_per_s"])),
    ),
    (
        "direct % of ceiling",
        ("direct", "ceiling"),
        lambda found: _percent_of_ceiling(found["direct"], found["ceiling"]),
    ),
)


def _main_table(rows: Rows) -> list[str]:
    """One line per target that ran a main scenario; only the columns of scenarios that ran."""
    ran = [s for s in MAIN_SCENARIOS if any(row["scenario"] == s for row in rows)]
    counted = [s for s in COUNTED_SCENARIOS if s in ran]
    columns = [
        (header, render)
        for header, needs, render in MAIN_COLUMNS
        if (set(needs) <= set(ran) if needs else counted)
    ]
    headers = ["target"]
    for header, _ in columns:
        if header == LOSSES and len(counted) > 1:
            header += f" ({' · '.join(counted)})"
        headers.append(header)
    lines = ["", "| " + " | ".join(headers) + " |", "|---|" + "--:|" * len(columns)]
    for target in _targets(rows):
        found: Found = {scenario: _find(rows, target, scenario) for scenario in ran}
        if not any(found.values()):
            continue
        cells = [target]
        for _, render in columns:
            if render is None:  # the losses of each counted scenario this target ran
                losses = [_cell(found[s], _losses) for s in counted if found[s] is not None]
                cells.append(" · ".join(losses) or "not run")
            else:
                cells.append(render(found))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# The main chart's panels: what each draws, from which scenarios. A panel is
# drawn only if one of its scenarios has a successful row.
THROUGHPUT_SCENARIOS = ("direct", "direct-ws", "ceiling")


def chart(result: dict[str, Any], path: Path) -> bool:
    """Throughput, latency and CPU per 1,000 messages per target, as one PNG.

    False, and no file, if the run has nothing to draw.
    """
    figure = chart_figure(result)
    if figure is None:
        return False
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def chart_figure(result: dict[str, Any]) -> Figure | None:
    """The figure :func:`chart` saves: only the panels with data, and in the
    throughput panel only the scenarios that ran; None if no panel has data."""
    rows: Rows = result["rows"]

    def ran(scenario: str) -> bool:
        return any(row["scenario"] == scenario and _ok(row) for row in rows)

    throughput_scenarios = [s for s in THROUGHPUT_SCENARIOS if ran(s)]
    panels = []
    if throughput_scenarios:
        panels.append("throughput")
    if ran("latency"):
        panels.append("latency")
    if ran("direct"):
        panels.append("cpu")
    if not panels:
        return None
    targets = [
        target
        for target in _targets(rows)
        if any(_ok(_find(rows, target, s)) for s in (*THROUGHPUT_SCENARIOS, "latency"))
    ]
    figure, axes_list = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6), squeeze=False)
    axes_of = dict(zip(panels, axes_list[0], strict=True))
    positions = range(len(targets))

    def values(scenario: str, pick: Any) -> list[float]:
        picked = []
        for target in targets:
            row = _find(rows, target, scenario)
            picked.append(pick(row) if _ok(row) else 0.0)
        return picked

    if "throughput" in axes_of:
        throughput = axes_of["throughput"]
        width = 0.8 / len(throughput_scenarios)
        middle = (len(throughput_scenarios) - 1) / 2
        for offset, scenario in enumerate(throughput_scenarios):
            throughput.bar(
                [p + (offset - middle) * width for p in positions],
                values(scenario, lambda r: r["msg_per_s"]),
                width,
                label=scenario,
            )
        throughput.set_yscale("log")
        throughput.set_title("delivered msg/s (log scale; 0 = error or not run)")
    if "latency" in axes_of:
        latency = axes_of["latency"]
        for offset, name in enumerate(("p50", "p99")):
            latency.bar(
                [p + (offset - 0.5) * 0.4 for p in positions],
                values("latency", lambda r, name=name: r["latency_ms"].get(name, 0.0)),
                0.4,
                label=f"latency {name}",
            )
        latency.set_title("latency scenario, ms (send -> WebSocket receipt)")
    if "cpu" in axes_of:
        cpu = axes_of["cpu"]
        bottom = [0.0] * len(targets)
        for role in ROLES:
            heights = values("direct", lambda r, role=role: r["cpu_per_1000"].get(role) or 0.0)
            cpu.bar(list(positions), heights, 0.6, bottom=bottom, label=role)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        cpu.set_title("direct: CPU seconds per 1,000 messages")
    for axes in axes_of.values():
        axes.set_xticks(list(positions))
        axes.set_xticklabels(targets, rotation=30, ha="right")
        axes.legend()
    figure.suptitle(
        f"triows bench {result['started']} · {result['machine']['cpu_model']} · "
        f"{result['machine']['logical_cores']} cores shared by load generator, instances, broker"
    )
    figure.tight_layout()
    return figure


def scaleout_chart(result: dict[str, Any], path: Path) -> None:
    """``scaleout``: delivered msg/s and server CPU per message against N, one line per target."""
    rows = [row for row in _scaleout_rows(result["rows"]) if _ok(row)]
    figure, (throughput, cpu) = plt.subplots(1, 2, figsize=(13, 5.5))
    for target in _targets(rows):
        mine = sorted(
            (row for row in rows if row["target"] == target), key=lambda r: r["instances"]
        )
        counts = [row["instances"] for row in mine]
        throughput.plot(counts, [row["msg_per_s"] for row in mine], marker="o", label=target)
        cpu.plot(
            counts,
            [row["server_cpu_ms_per_message"] or 0.0 for row in mine],
            marker="o",
            label=target,
        )
    throughput.set_title("delivered msg/s (senders on 1 instance, receivers on 1)")
    cpu.set_title("server CPU ms per delivered message, all instances")
    for axes in (throughput, cpu):
        axes.set_xticks(sorted({row["instances"] for row in rows}))
        axes.set_xlabel("instances")
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(
        f"triows bench scaleout {result['started']} · {result['machine']['cpu_model']} · "
        f"{result['machine']['logical_cores']} cores shared by everything"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(result: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    """Write ``STEM.json``, ``STEM.md`` and ``STEM.png`` into ``directory``.

    No ``STEM.png`` if the run has nothing the chart draws (only ``batch`` or
    ``room`` rows, say): their figures are in the Markdown tables.
    A run with ``scaleout`` rows draws them in ``STEM.png`` if that is all it ran,
    else in ``STEM-scaleout.png`` beside the usual chart.
    """
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path = directory / f"{stem}.md"
    md_path.write_text(markdown(result), encoding="utf-8")
    png_path = directory / f"{stem}.png"
    paths = [json_path, md_path, png_path]
    rows: Rows = result["rows"]
    if all(row["scenario"] == "scaleout" for row in rows):
        scaleout_chart(result, png_path)
        return paths
    if not chart(result, png_path):
        paths.remove(png_path)
    if _scaleout_rows(rows):
        scaleout_path = directory / f"{stem}-scaleout.png"
        scaleout_chart(result, scaleout_path)
        paths.append(scaleout_path)
    return paths
