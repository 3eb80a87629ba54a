"""The triows benchmark suite: a Trio load generator driving real ``triows serve`` processes.

Run it through nox (``nox -s bench -- direct``, ``nox -s bench_matrix``) or
directly (``python -m bench --help``); ``bench/README.md`` says what every
figure means.
"""
