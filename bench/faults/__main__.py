"""``python -m bench.faults``: run cases and merge their rows into ``bench/results/``."""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

import bench.faults
from bench.faults.case import run_case
from bench.faults.churn import run_churn
from bench.faults.clients import dead_client_wait, run_dead_client, run_fanout
from bench.faults.options import CLUSTER_FAULTS, FAULTS, Options, quick_options
from bench.faults.report import merge_results
from bench.faults.sessions import RESUME_FAULTS, SESSION_NODE_FAULTS, run_resume_case
from bench.targets import CLUSTER_TARGETS, TARGETS, ensure_broker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=(bench.faults.__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--target",
        action="append",
        choices=[*(t for t in TARGETS if t != "memory"), *CLUSTER_TARGETS],
        help="default: every single-broker target (a cluster target runs when named)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        choices=[
            *FAULTS,
            "dead-client",
            "churn",
            "fanout",
            *RESUME_FAULTS,
            *CLUSTER_FAULTS,
            *SESSION_NODE_FAULTS,
        ],
        help=(
            f"default: all but {', '.join((*CLUSTER_FAULTS, *SESSION_NODE_FAULTS))}, "
            "which only a cluster target runs (and runs by default)"
        ),
    )
    parser.add_argument(
        "--rate", type=float, help="messages/s over all users (default 30 %% of direct)"
    )
    parser.add_argument("--quick", action="store_true", help="short phases (seconds each)")
    parser.add_argument("--cycles", type=int, default=10_000, help="churn cycles")
    parser.add_argument("--sockets", type=int, default=1000, help="fanout sockets")
    parser.add_argument(
        "--dead-client-wait", type=float, default=None, help="default: from the ping interval"
    )
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    opts = quick_options(args.rate) if args.quick else Options(rate=args.rate)
    targets = args.target or [t for t in TARGETS if t != "memory"]
    for name in targets:
        target = TARGETS.get(name) or CLUSTER_TARGETS[name]
        ensure_broker(target)
        if args.fault:
            faults = args.fault
        elif name in CLUSTER_TARGETS:
            faults = [*CLUSTER_FAULTS, *SESSION_NODE_FAULTS]
        else:
            faults = [*FAULTS, "dead-client", "churn", "fanout", *RESUME_FAULTS]
        for fault in faults:
            print(f"faults: {name} {fault} ...", file=sys.stderr, flush=True)
            try:
                if fault == "fanout":
                    row = await run_fanout(target, args.sockets, 20, opts)
                elif fault == "churn":
                    row = await run_churn(target, args.cycles, opts)
                elif fault in (*RESUME_FAULTS, *SESSION_NODE_FAULTS):
                    row = await run_resume_case(target, fault, opts)
                elif fault == "dead-client":
                    row = await run_dead_client(
                        target, opts, args.dead_client_wait or dead_client_wait(opts)
                    )
                else:
                    row = await run_case(target, fault, opts)
            except Exception as error:
                if os.environ.get("TRIOWS_FAULTS_RAISE"):
                    raise
                row = {"target": name, "fault": fault, "status": "error", "why": repr(error)[:300]}
            print(json.dumps(row)[:2000], file=sys.stderr, flush=True)
            merge_results([row])


if __name__ == "__main__":
    trio.run(main)
