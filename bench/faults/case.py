"""One fault on one target under steady traffic, with every message accounted."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import trio

from bench.faults.accounting import (
    account,
    first_404,
    longest_silence,
    recovered,
    recovery,
    sent_rate,
    wait_delivered,
)
from bench.faults.broker import (
    fault_kill,
    fault_node_kill,
    fault_node_kill_sender,
    fault_node_restart,
    fault_node_stop,
    fault_outage,
)
from bench.faults.cluster import log_tails, open_cluster, process_stats, sessions_lost
from bench.faults.fault import FaultRun, NotPossible
from bench.faults.instance import fault_death, fault_drain
from bench.faults.network import fault_close, fault_drop, fault_halfopen, fault_slow
from bench.faults.options import (
    DEFAULT_RATE_SHARE,
    DELIVERY_TIMEOUT,
    PINNED_USER,
    POLL,
    SETTLE_TIMEOUT,
    Options,
    direct_rate,
)
from bench.faults.traffic import Clock, Traffic, now
from bench.targets import Target

FAULT_RUNS: dict[str, FaultRun] = {
    "outage": fault_outage,
    "kill": fault_kill,
    "close": fault_close,
    "drop": fault_drop,
    "halfopen": fault_halfopen,
    "slow": fault_slow,
    "drain": fault_drain,
    "death": fault_death,
    "node-stop": fault_node_stop,
    "node-kill": fault_node_kill,
    "node-kill-sender": fault_node_kill_sender,
    "node-restart": fault_node_restart,
}


async def run_case(target: Target, fault: str, opts: Options) -> dict[str, Any]:
    """One fault on one target under steady traffic; the accounting and times as a dict."""
    rate = opts.rate or round(direct_rate(target) * DEFAULT_RATE_SHARE, 1)
    started = time.time()
    async with open_cluster(target, opts) as cluster:
        traffic = Traffic(cluster, rate, opts.users)
        if fault == "death":
            traffic.pinned[PINNED_USER] = "a"
        if fault == "node-kill-sender":
            traffic.send_to, traffic.receive_on = "a", "b"
        async with traffic.running():
            await trio.sleep(opts.before)
            before_sockets = {
                label: sum(1 for s in traffic.sockets if s.closed is None and s.instance == label)
                for label in cluster.nodes
            }
            clock = Clock(traffic)
            try:
                details = await FAULT_RUNS[fault](cluster, traffic, clock, opts)
            except NotPossible as why:
                return {
                    "target": target.name,
                    "fault": fault,
                    "status": "not possible",
                    "why": str(why),
                }
            if clock.during_until > now():
                await trio.sleep_until(clock.during_until)
            traffic.phase = "after"
            await trio.sleep(opts.after)
            alive = [label for label in cluster.nodes if label not in cluster.stopped]
            # The after phase lasts until the system has recovered (or a hang
            # guard), so that what is counted never depends on how fast that was.
            waiting_for_404 = fault == "death" and target.backend == "amqp091"
            settled_after = now()
            with trio.move_on_after(SETTLE_TIMEOUT):
                while not recovered(traffic, clock.end, alive, waiting_for_404):  # noqa: ASYNC110
                    await trio.sleep(POLL)
            settled_after = round(now() - settled_after, 3)
            stopped_sending = now()
            traffic.stop_sending()
            await trio.sleep(opts.grace)
            await wait_delivered(traffic, DELIVERY_TIMEOUT)
            if fault == "death":
                details["pinned_first_404_s"] = first_404(traffic, clock.begin)
            exited = {
                label: cluster.nodes[label].process.returncode
                for label in alive
                if cluster.nodes[label].process.returncode is not None
            }
            closed_sockets = [
                {
                    "user": s.user,
                    "instance": s.instance,
                    "code": s.code,
                    "at_s": round(s.closed - clock.begin, 3),
                }
                for s in traffic.sockets
                if s.closed is not None and s.closed >= clock.begin
            ]
            stats = {
                label: process_stats(cluster.nodes[label]) for label in alive if label not in exited
            }
            sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
            resumed = sorted(
                user
                for user, seqs in traffic.receipts.items()
                if any(sent_at.get((user, lane, seq), -1.0) >= clock.end for lane, seq, _ in seqs)
            )
            resumed_all = set(traffic.users) <= set(resumed)
            return {
                "target": target.name,
                "fault": fault,
                "status": "ok",
                "rate": rate,
                "sent_per_s": sent_rate(traffic),
                "lanes": traffic.lanes,
                "options": asdict(opts),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                "fault_s": round(clock.end - clock.begin, 3),
                "after_extended_s": settled_after,
                "sockets_before": before_sockets,
                "unexpected_exits": exited,
                "sockets_closed": closed_sockets,
                "connect_failures": traffic.connect_failures,
                "accounting": account(traffic),
                # Users (HAProxy-connected; pinned ones are gone with their instance)
                # that got a message sent after the fault's end: subscriptions restored.
                "users": len(traffic.users),
                "users_resumed": len([u for u in resumed if u in traffic.users]),
                "recovery": recovery(traffic, clock.end, alive),
                # From the fault's start: how long delivery stopped for anyone.
                "longest_silence": longest_silence(traffic, clock.begin, stopped_sending),
                "instances": stats,
                "details": details,
                "errors": traffic.errors,
                # Each refusal from the fault's start: when it was asked (s), its
                # status, and for a 503 from an instance its detail.
                "refusals": [
                    [round(s.t0 - clock.begin, 3), s.status, s.detail]
                    for s in traffic.sends
                    if s.status != 202 and s.t0 >= clock.begin
                ][:40],
                # Each instance's /readyz changes from the fault's start: (s, status).
                "readiness": {
                    label: [
                        [round(t - clock.begin, 3), status]
                        for t, status in changes
                        if t >= clock.begin
                    ]
                    for label, changes in traffic.ready.items()
                },
                # What the instances logged, kept when something went wrong.
                "log_tail": (
                    log_tails(cluster) if traffic.errors or exited or not resumed_all else {}
                ),
                "sessions_lost": sessions_lost(cluster),
            }
