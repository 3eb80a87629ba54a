"""``python -m bench``: run scenarios on targets and write JSON, Markdown and PNG results.

    python -m bench direct --backend amqp091-rabbitmq      one scenario, one target
    python -m bench direct latency --backend stomp         a backend name means all its brokers
    python -m bench direct --backend amqp091-rabbitmq --backend peer-socketio
    python -m bench scaleout [--instances 2,4,6]           triows (amqp091) and the peer
    python -m bench --matrix [--quick]                     every scenario on every target

Exit status 1 if any row is an error or any message was lost or duplicated.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from bench.machine import machine_facts
from bench.report import write
from bench.scenarios import MATRIX_SCENARIOS, SCENARIOS, TRAFFIC_SCENARIOS, Options, run_target
from bench.targets import (
    CLUSTER_TARGETS,
    PEER_TARGETS,
    TARGETS,
    Target,
    with_queue_type,
    with_resume_window,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Quick runs prove the bench works; their figures are not results.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"


# scaleout alone, without --backend: triows on its reference broker, and the peer.
SCALEOUT_TARGETS = ("amqp091-rabbitmq", "peer-socketio")


def _targets(names: list[str] | None, scenarios: list[str] | None = None) -> list[Target]:
    every = {**TARGETS, **PEER_TARGETS}
    if not names and scenarios == ["scaleout"]:
        names = list(SCALEOUT_TARGETS)
    if not names:
        return list(every.values())
    chosen: list[Target] = []
    for name in names:
        # A cluster target only by its own name (a backend name means the single brokers).
        matches = [t for t in every.values() if name in (t.name, t.backend)] + [
            t for t in CLUSTER_TARGETS.values() if name == t.name
        ]
        if not matches:
            backends = sorted({t.backend for t in every.values()})
            known = ", ".join([*every, *CLUSTER_TARGETS, *backends])
            raise SystemExit(f"bench: unknown target or backend {name!r}; known: {known}")
        chosen += [target for target in matches if target not in chosen]
    return chosen


def _raise_file_limit() -> None:
    """Idle connections need a descriptor each, here and in the instance (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _failed(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    for row in rows:
        where = f"{row['target']}/{row['scenario']}"
        if row.get("status") == "n/a":
            continue
        if row.get("status") != "ok":
            problems.append(f"{where}: {row.get('error')}")
        elif row["scenario"] in (*TRAFFIC_SCENARIOS, "ceiling", "scaleout") and (
            row["lost"] or row["duplicated"] or row["out_of_order"]
        ):
            problems.append(
                f"{where}: lost {row['lost']}, duplicated {row['duplicated']}, "
                f"out of order {row['out_of_order']}"
            )
    return problems


async def run(
    scenarios: list[str], targets: list[Target], options: Options, rate: float | None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for target in targets:
        print(f"bench: {target.name}: {', '.join(scenarios)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        target_rows = await run_target(
            target,
            scenarios,
            options,
            rates={target.name: rate / options.latency_share} if rate else None,
        )
        for row in target_rows:
            print(f"bench:   {_one_line(row)}", file=sys.stderr, flush=True)
        print(
            f"bench: {target.name} took {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        rows += target_rows
    return rows


def _one_line(row: dict[str, Any]) -> str:
    if row.get("status") == "n/a":
        return f"{row['scenario']}: n/a ({row['error']})"
    if row.get("status") != "ok":
        return f"{row['scenario']}: ERROR {row['error']}"
    if row["scenario"] == "idle":
        return (
            f"idle: {row['connections']} connections, "
            f"{row['rss_kib_per_connection']} KiB each, {row['idle_cpu_percent']} % CPU"
        )
    latency = row["latency_ms"]
    server = ""
    if "server_cpu_ms_per_message" in row:
        server = (
            f"{row['params']['instances']} instances, "
            f"server CPU {row['server_cpu_ms_per_message']} ms/msg, "
        )
    return (
        f"{row['scenario']}: {row['msg_per_s']} msg/s, {server}delivered {row['delivered']}, "
        f"lost {row['lost']}, dup {row['duplicated']}, ooo {row['out_of_order']}, "
        f"p50 {latency.get('p50')} p99 {latency.get('p99')} ms, "
        f"load generator {100 * row['loadgen_cpu_share']:.0f} % of a core"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"one or more of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--matrix", action="store_true", help="every scenario on every target")
    parser.add_argument(
        "--backend",
        action="append",
        metavar="TARGET",
        help=(
            f"a target ({', '.join([*TARGETS, *PEER_TARGETS, *CLUSTER_TARGETS])}) or a "
            "backend name (the single-broker targets); repeatable; default: all but the "
            "cluster ones (scaleout alone: " + ", ".join(SCALEOUT_TARGETS) + ")"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="brief runs that prove it works")
    parser.add_argument("--duration", type=float, help="seconds of measured traffic per scenario")
    parser.add_argument("--concurrency", type=int, help="sends in flight (streams)")
    parser.add_argument("--receivers", type=int, help="receiving users on instance B")
    parser.add_argument("--connections", type=int, help="idle: WebSocket connections")
    parser.add_argument("--rate", type=float, help="latency: msg/s (default: 20%% of direct)")
    parser.add_argument("--batch-size", type=int, help="batch: messages per POST (100)")
    parser.add_argument(
        "--instances", help="scaleout: instance counts, comma-separated (default 2,4,6)"
    )
    parser.add_argument(
        "--resume-window",
        metavar="S,S",
        help=(
            "run each triows target once per TRIOWS_RESUME_WINDOW, comma-separated "
            "(0,120: sessions off, then on), named TARGET:resumeS"
        ),
    )
    parser.add_argument(
        "--queue-type",
        metavar="T,T",
        help=(
            "run each triows target once per TRIOWS_QUEUE_TYPE, comma-separated "
            "(classic,quorum: the session queues' type), named TARGET:T"
        ),
    )
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    scenarios = list(MATRIX_SCENARIOS) if args.matrix else args.scenarios
    if not scenarios:
        parser.error("name at least one scenario, or --matrix")
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; scenarios: {', '.join(SCENARIOS)}")
    options = Options.quick_options() if args.quick else Options()
    overrides = {
        "duration": args.duration,
        "concurrency": args.concurrency,
        "receivers": args.receivers,
        "idle_connections": args.connections,
        "batch_size": args.batch_size,
    }
    if args.instances:
        try:
            counts = tuple(int(count) for count in args.instances.split(","))
        except ValueError:
            parser.error(f"--instances takes numbers like 2,4,6, not {args.instances!r}")
        if min(counts) < 2:
            parser.error("--instances: scaleout needs at least 2 instances (senders, receivers)")
        overrides["scaleout_instances"] = counts
    options = dataclasses.replace(options, **{k: v for k, v in overrides.items() if v})
    targets = _targets(args.backend, scenarios)
    if args.resume_window:
        windows = args.resume_window.split(",")
        if not all(window.replace(".", "", 1).isdigit() for window in windows):
            parser.error(f"--resume-window takes seconds like 0,120, not {args.resume_window!r}")
        targets = _triows_variants(targets, with_resume_window, windows)
    if args.queue_type:
        kinds = args.queue_type.split(",")
        if not set(kinds) <= {"classic", "quorum"}:
            parser.error(f"--queue-type takes classic and/or quorum, not {args.queue_type!r}")
        targets = _triows_variants(targets, with_queue_type, kinds)
    _raise_file_limit()

    started = datetime.now(UTC)
    clock = time.perf_counter()
    machine = machine_facts()
    rows = trio.run(run, scenarios, targets, options, args.rate)
    result = {
        "suite": "triows-bench",
        "format": 1,
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "run_seconds": round(time.perf_counter() - clock, 1),
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "quick": options.quick,
        "scenarios": scenarios,
        "targets": [dataclasses.asdict(target) for target in targets],
        "options": dataclasses.asdict(options),
        "machine": machine,
        "rows": rows,
    }
    directory = args.out or (QUICK_RESULTS_DIR if options.quick else RESULTS_DIR)
    if args.matrix:
        stem = "quick-matrix" if options.quick else "matrix"
    else:
        stem = "-".join(scenarios) + "-" + started.strftime("%Y%m%d-%H%M%S")
    paths = write(result, directory, stem)
    print(paths[1].read_text(encoding="utf-8"))
    print("bench: wrote " + ", ".join(str(path) for path in paths), file=sys.stderr)
    print(f"bench: run took {result['run_seconds']:.0f} s", file=sys.stderr)
    problems = _failed(rows)
    for problem in problems:
        print(f"bench: FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


def _triows_variants(
    targets: list[Target], variant: Callable[[Target, str], Target], values: list[str]
) -> list[Target]:
    """Each triows target once per value (``variant(target, value)``); peers as they are."""
    return [
        made
        for target in targets
        for made in (
            [variant(target, value) for value in values] if target.server == "triows" else [target]
        )
    ]


if __name__ == "__main__":
    sys.exit(main())
