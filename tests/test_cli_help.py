"""``triows --help`` and each subcommand's ``--help`` read as plain text.

argparse prints descriptions and help strings as they are, so markup taken
from a docstring (reStructuredText's double backticks) would show literally.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from triows.cli import _parser


def subcommands() -> list[str]:
    (action,) = (a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_every_subcommand_is_checked() -> None:
    assert subcommands() == ["demo", "serve", "token"]


@pytest.mark.parametrize("command", [[], *([name] for name in subcommands())], ids=str)
def test_help_has_no_restructuredtext_markup(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triows", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("usage: triows")
    assert "``" not in result.stdout


def test_the_cluster_help_has_no_restructuredtext_markup() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triows.cluster", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("usage: python -m triows.cluster")
    assert "``" not in result.stdout
