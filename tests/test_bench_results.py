"""``bench/results/`` holds only runs the documentation cites: old ones live in git's history."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "bench/results"
CHART_SUFFIX = "-scaleout"  # a mixed run's second chart, STEM-scaleout.png


def committed_results() -> list[str]:
    """The files under ``bench/results/`` that git tracks (local bench runs aside)."""
    listed = subprocess.run(
        ["git", "ls-files", "--", RESULTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [Path(name).name for name in listed if Path(name).parent == Path(RESULTS)]


def run_stem(name: str) -> str:
    """The run a results file belongs to: ``STEM.json``, ``STEM.md``, ``STEM.png``, its chart."""
    stem = name.split(".", 1)[0]
    return stem.removesuffix(CHART_SUFFIX) if name.endswith(f"{CHART_SUFFIX}.png") else stem


def documentation() -> str:
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(ROOT.glob("docs/*.md"))]
    return "\n".join(page.read_text() for page in pages if page.exists())


def test_every_committed_result_is_cited_by_the_documentation() -> None:
    text = documentation()
    uncited = sorted(
        name
        for name in committed_results()
        if not re.search(rf"(?<![\w-]){re.escape(run_stem(name))}\.(md|jsonl?|png)\b", text)
    )
    assert uncited == [], (
        "bench/results/ keeps only runs that README.md, docs/*.md or bench/README.md cite; "
        f"cite these or delete them (git keeps the history): {uncited}"
    )


def test_results_files_of_one_run_share_its_stem() -> None:
    assert run_stem("scaleout-idle-20261201-034549-scaleout.png") == "scaleout-idle-20261201-034549"
    assert run_stem("direct-before-6259e31.json") == "direct-before-6259e31"
    assert run_stem("matrix.png") == "matrix"
