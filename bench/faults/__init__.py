"""Bad days, measured: broker faults, drain and death under load, dead clients and churn.

One *case* is one fault on one target (a backend on a broker, as in
``bench/targets.py``). Each case runs real processes: two ``triows serve``
instances behind an HAProxy generated from ``deploy/haproxy.cfg`` (same
settings, the ports this run chose), each instance reaching its broker
through a :class:`bench.faults.proxy.FaultProxy` of its own, so that a
network fault hits one instance only. Receivers (one socket per user) connect
through HAProxy and reconnect through it when closed; the instance each one
landed on is taken from its ``hello``. A sender loop per user POSTs ``/send``
through HAProxy at a fixed overall rate, one request at a time per user, so
each user's messages have an order.

Every message sent is accounted, per phase of its sending (``before``,
``during`` and ``after`` the fault): 2xx (``routed``/``accepted``) and
delivered, 2xx but never delivered (*2xx-but-lost*; of those, how many while
the recipient had a socket open over the whole request), refused (503 from an
instance, 503 from HAProxy, 404, a transport error), duplicated, reordered,
and delivered although refused. Recovery times run from the fault's end to
the first delivery of a message sent after it, and to ``/readyz`` 200 on
every surviving instance. Times are reported, never asserted.

``python -m bench.faults`` runs cases and writes ``bench/results/faults.json``
(merged by case, so runs accumulate) and ``bench/results/faults.md``;
``nox -s faults`` runs the full set. ``tests/test_faults.py`` runs short
versions and asserts the guarantees (never times).
"""

from bench.faults.case import run_case
from bench.faults.churn import run_churn
from bench.faults.clients import dead_client_wait, run_dead_client, run_fanout
from bench.faults.options import FAULTS, Options, ci_options, quick_options
from bench.faults.report import merge_results

__all__ = [
    "FAULTS",
    "Options",
    "ci_options",
    "dead_client_wait",
    "merge_results",
    "quick_options",
    "run_case",
    "run_churn",
    "run_dead_client",
    "run_fanout",
]
