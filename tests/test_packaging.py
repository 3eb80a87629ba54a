"""What ``pip install .`` puts in site-packages: the server and its backends under ``triows``.

Builds the wheel from this checkout (as ``pip install .`` does) and reads its
file list, so a package with a generic top-level name (``backends``) can never
be installed next to other distributions' again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Hang guard only: building the wheel may fetch setuptools into an isolated environment.
BUILD_TIMEOUT = 300
NOT_SOURCES = (".*", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench")


def built_wheel(out: Path) -> list[str]:
    # From a copy of the sources: pip builds in the tree, and a build/ folder
    # left by an older build would be packed again.
    source = out / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        timeout=BUILD_TIMEOUT,
    )
    (wheel,) = out.glob("triows-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_installs_only_the_triows_package_with_the_backends_inside(
    tmp_path: Path,
) -> None:
    names = built_wheel(tmp_path)
    top_level = {name.split("/", 1)[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"triows"}, top_level
    for module in ("memory", "amqp091", "amqp10", "stomp", "supervisor"):
        assert f"triows/backends/{module}.py" in names
    assert "triows/backends/py.typed" in names
    assert "triows/static/chat.html" in names
    assert "triows/static/triows.js" in names
    assert any(name.endswith("entry_points.txt") for name in names)


def test_the_backend_registry_names_modules_under_triows() -> None:
    from triows.backend import BUILTIN_BACKENDS

    for target in BUILTIN_BACKENDS.values():
        assert target.startswith("triows.backends."), target
