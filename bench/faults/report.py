"""The results: merged by case into ``bench/results/faults.json`` and its Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.faults.options import CLUSTER_FAULTS, FAULTS, RESULTS_DIR
from bench.faults.sessions import RESUME_FAULTS, SESSION_NODE_FAULTS


def merge_results(
    rows: list[dict[str, Any]], path: Path = RESULTS_DIR / "faults.json"
) -> list[dict[str, Any]]:
    """Merge ``rows`` into ``path`` by (target, fault); return all rows."""
    try:
        existing = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        existing = []
    keyed = {(r["target"], r["fault"]): r for r in existing}
    for row in rows:
        keyed[(row["target"], row["fault"])] = row
    merged = sorted(keyed.values(), key=lambda r: (r["target"], FAULT_ORDER.get(r["fault"], 99)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": "triows-faults", "rows": merged}, indent=1) + "\n")
    (path.with_suffix(".md")).write_text(markdown(merged))
    return merged


FAULT_ORDER = {
    name: n
    for n, name in enumerate(
        (
            *FAULTS,
            "dead-client",
            "churn",
            "fanout",
            *RESUME_FAULTS,
            *CLUSTER_FAULTS,
            *SESSION_NODE_FAULTS,
        )
    )
}


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Fault runs (bench/faults)",
        "",
        "Per case: messages 2xx / delivered / 2xx-but-lost (of which while the recipient "
        "was connected) / refused (503 instance, 503 HAProxy, 404, transport error) / "
        "duplicated / reordered, over the whole run; `during` = sent while the fault lasted. "
        "Recovery: seconds from the fault's end to the first delivery of a message sent "
        'after it, and to /readyz 200 on every surviving instance; "longest without a '
        "delivery\": from the fault's start, the longest any user went without a message "
        "(under steady traffic: how long delivery stopped for the users the fault hit).",
        "",
        "| target | fault | rate msg/s asked / sent | 2xx | delivered | 2xx-but-lost (connected) | "
        "refused during: 503 / lb503 / 404 / err | dup | reord | first delivery s | all ready s | "
        "alive | notes | command |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for row in rows:
        if row["fault"] in (*RESUME_FAULTS, *SESSION_NODE_FAULTS):
            continue
        command = f"`python -m bench.faults --target {row['target']} --fault {row['fault']}`"
        if row["status"] != "ok":
            lines.append(
                f"| {row['target']} | {row['fault']} | | | | | | | | | | | "
                f"{row['status']}: {row.get('why', '')} | {command} |"
            )
            continue
        if row["fault"] in ("fanout", "churn", "dead-client"):
            lines.append(
                f"| {row['target']} | {row['fault']} | | | | | | | | | | "
                f"{_fmt(row.get('alive', True))} | {_extra_notes(row)} | {command} |"
            )
            continue
        total = row["accounting"]["total"]
        recovered = row["recovery"]
        during = row["accounting"].get("during", {})
        two = total.get("2xx_routed", 0) + total.get("2xx_accepted", 0)
        refused = " / ".join(
            str(during.get(k, 0))
            for k in ("refused_503", "refused_503_lb", "refused_404", "transport_error")
        )
        lines.append(
            f"| {row['target']} | {row['fault']} | {row['rate']:g} / {row.get('sent_per_s', 0):g} "
            f"| {two} "
            f"| {total.get('delivered', 0)} "
            f"| {total.get('2xx_lost', 0)} ({total.get('2xx_lost_while_connected', 0)}) "
            f"| {refused} | {total.get('duplicated', 0)} | {total.get('reordered', 0)} "
            f"| {_fmt(recovered['first_delivery_s'])} | {_fmt(recovered['all_ready_s'])} | "
            f"{'yes' if not row['unexpected_exits'] else 'NO ' + str(row['unexpected_exits'])} | "
            f"{_extra_notes(row)} | {command} |"
        )
    resume_rows = [row for row in rows if row["fault"] in RESUME_FAULTS]
    if resume_rows:
        lines += ["", *resume_markdown(resume_rows)]
    node_rows = [row for row in rows if row["fault"] in SESSION_NODE_FAULTS]
    if node_rows:
        lines += ["", *session_node_markdown(node_rows)]
    return "\n".join(lines) + "\n"


def resume_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The continuity table: instance B drained or killed, its users resuming on A."""
    lines = [
        "## Sessions: instance B drained or SIGKILLed, its users resuming on A",
        "",
        "Not resumed: a fresh session (`resumed` false), what a backend that cannot hold "
        "sessions (`resumable` false) always gives. N users on B hold sockets with the URL "
        "list [B, A] and resume with their session's "
        "token and cursor; senders POST to A every 5 ms overall (4 sequential lanes; sent/s: "
        "the pace a loaded machine let them keep), to each user in turn. Per case: "
        "sent / refused (non-2xx or transport error) / 2xx but never delivered / delivered "
        "twice to one user / out of order; `queued`: 2xx answered `queued` (the session "
        "waited for its resume); seconds from the signal to the last user's `hello` with "
        '`"resumed": true`.',
        "",
        "| target | fault | resumable | users | sent (sent/s) | refused | 2xx-but-lost | dup "
        "| reord | queued | resumed / not | all resumed s | B exit s | command |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        command = _command(row)
        if row["status"] != "ok":
            lines.append(_failed(row, 11))
            continue
        acc = row["accounting"]
        not_resumed = row["users_not_resumed"] + row["users_not_back"]
        lines.append(
            f"| {row['target']} | {row['fault']} | {'yes' if row['resumable'] else 'no'} "
            f"| {row['users_on_b']} | {acc['sent']} ({row['sent_per_s']:g}) | {acc['refused']} "
            f"| {acc['lost_2xx']} "
            f"| {acc['duplicated']} | {acc['reordered']} | {acc['outcomes'].get('queued', 0)} "
            f"| {row['users_resumed']} / {not_resumed} | {_fmt(row['all_resumed_s'])} "
            f"| {_fmt(row['exit_s'])} | {command} |"
        )
    return lines


def session_node_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The node-loss table with sessions: quorum session queues, the node under B lost."""
    lines = [
        "## Sessions on a RabbitMQ cluster: the node under instance B lost",
        "",
        "Sessions on (`TRIOWS_RESUME_WINDOW=120`), their queues quorum queues "
        "(`TRIOWS_QUEUE_TYPE=quorum`). The users' sockets and the senders as above; the node "
        "under B (node 2, first in B's list) is SIGKILLed (`session-node-kill`) or shut down "
        "whole (`session-node-restart`), then booted again. Per case: sent / refused / 2xx "
        "but never delivered / delivered twice / out of order / a `seq` not one more than "
        "the one before; sockets that closed and opened again; the longest any user went "
        "without a delivery from the fault's start.",
        "",
        "| target | fault | users | sent (sent/s) | refused | 2xx-but-lost | dup | reord "
        "| seq gaps | sockets reopened | longest without a delivery s | queues before / after "
        "| command |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        command = _command(row)
        if row["status"] != "ok":
            lines.append(_failed(row, 10))
            continue
        acc = row["accounting"]
        queues = row["session_queues"]
        lines.append(
            f"| {row['target']} | {row['fault']} | {row['users_on_b']} "
            f"| {acc['sent']} ({row['sent_per_s']:g}) | {acc['refused']} | {acc['lost_2xx']} "
            f"| {acc['duplicated']} | {acc['reordered']} | {acc['seq_not_consecutive']} "
            f"| {row['sockets_reopened']} | {_fmt(row['longest_without_delivery_s'])} "
            f"| {_fmt(queues['before'])} / {_fmt(queues['after'])} | {command} |"
        )
    return lines


def _command(row: dict[str, Any]) -> str:
    return f"`python -m bench.faults --target {row['target']} --fault {row['fault']}`"


def _failed(row: dict[str, Any], empty: int) -> str:
    """A sessions table's row for a case that did not run: ``empty`` blank cells, then its
    command and why."""
    blanks = " |" * empty
    return (
        f"| {row['target']} | {row['fault']} |{blanks} "
        f"{_command(row)} ({row['status']}: {row.get('why', '')}) |"
    )


def _extra_notes(row: dict[str, Any]) -> str:
    fault = row["fault"]
    if fault == "fanout":
        return (
            f"{row['sockets']} sockets x {row['messages']} msgs: "
            f"{row['sockets_complete_in_order']} "
            f"sockets got all in order; RSS {row['instance_b']['rss_mib']} MiB"
        )
    if fault == "churn":
        b, s = row["baseline"], row["settled"]
        parts = [f"{row['cycles']} cycles, {row['failures']} failed"]
        for label in ("a", "b"):
            parts.append(
                f"{label}: fds {b[label]['fds']}→{s[label]['fds']}, "
                f"RSS {b[label]['rss_mib']}→{s[label]['rss_mib']} MiB"
            )
        if "broker_bindings" in s:
            parts.append(f"bindings {b['broker_bindings']}→{s['broker_bindings']}")
        for label, slope in row.get("rss_slope_kib_per_1000_cycles", {}).items():
            if slope is not None:
                parts.append(f"{label}: RSS {slope:+} KiB per 1,000 cycles")
        return "; ".join(parts)
    if fault == "dead-client":
        if not row.get("release_observable", True):
            return "release not observable here (STOMP on ActiveMQ: no 404, no binding list)"
        return (
            f"killed client released after {_fmt(row['killed_released_s'])} s; half-open client "
            f"after {_fmt(row['half_open_released_s'])} s (waited {row['waited_s']} s)"
        )
    details = row.get("details", {})
    closed = row.get("sockets_closed", [])
    notes = [f"sockets closed: {len(closed)}"]
    codes = sorted({c["code"] for c in closed if c["code"] is not None})
    if codes:
        notes[-1] += f" (codes {codes})"
    for key in (
        "exit_code",
        "exit_s",
        "readyz_503_before_first_close",
        "a_unready_after_s",
        "broker_forgot_s",
        "pinned_first_404_s",
        "heartbeat_s",
        "rejoined",
    ):
        if key in details:
            notes.append(f"{key}={_fmt(details[key])}")
    silence = row.get("longest_silence")
    if silence is not None:
        # From the fault's start: how long delivery stopped for the users it hit.
        notes.append(f"longest without a delivery: {silence['seconds']} s")
    return "; ".join(notes)
