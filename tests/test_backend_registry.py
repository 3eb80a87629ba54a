"""Backends are found by name: built in, or from another package's entry point."""

from __future__ import annotations

from importlib.metadata import EntryPoint, EntryPoints
from typing import Any

import pytest

from triows import backend as registry
from triows.backend import UnknownBackend, known_backends, load_backend
from triows.backends.memory import open_memory_backend


def test_builtin_backends_are_imported_lazily_by_name() -> None:
    assert load_backend("memory") is open_memory_backend


def test_a_package_can_add_a_backend_through_the_entry_point_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    third_party = EntryPoint(
        name="inproc", value="triows.backends.memory:open_memory_backend", group="triows.backends"
    )

    def entry_points(**selection: Any) -> EntryPoints:
        return EntryPoints([third_party]).select(**selection)

    monkeypatch.setattr(registry, "entry_points", entry_points)
    assert load_backend("inproc") is open_memory_backend
    assert "inproc" in known_backends()


def test_an_unknown_name_lists_every_known_backend() -> None:
    with pytest.raises(UnknownBackend) as unknown:
        load_backend("zeromq")
    for name in ("memory", "amqp091", "amqp10", "stomp"):
        assert name in str(unknown.value)
