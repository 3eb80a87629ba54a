"""The docs stay true to the code: settings, names, links, and a short README.

- Every setting the server reads (a field of ``triows.settings.Settings``,
  each carrying its environment variable) has a row in a settings table of
  docs/operations.md, and every row there is such a setting.
- Every ``TRIOWS_*`` name the README or docs/ mention is named in the code
  (a setting, or a variable the deployment files or the broker script read),
  so a renamed or removed variable cannot linger in the docs.
- Every relative link in README.md, docs/*.md and bench/README.md resolves to
  a file of the repository, and a ``#anchor`` to a heading of the target.
- The README is a front door: at most 250 lines.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from triows.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
# Where code that reads TRIOWS_* variables lives (Python, the HAProxy config, ...).
CODE_DIRS = ["triows", "backends", "deploy", "bench"]
README_MAX_LINES = 250

NAME = re.compile(r"TRIOWS_[A-Z0-9_]*[A-Z0-9]")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def setting_variables() -> set[str]:
    return {f.metadata["env"] for f in fields(Settings)}


def section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level or higher."""
    level = heading.split(" ", 1)[0]
    assert heading in text.splitlines(), f"no heading {heading!r}"
    body = text.split(f"\n{heading}\n", 1)[1]
    same_or_higher = re.compile(rf"^#{{1,{len(level)}}} ", re.MULTILINE)
    ends = [match.start() for match in same_or_higher.finditer(body)]
    return body[: ends[0]] if ends else body


def table_row_variables(text: str) -> set[str]:
    """``TRIOWS_*`` names in the first cell of every table row of ``text``."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| "):
            names.update(NAME.findall(line.split("|")[1]))
    return names


def code_text() -> str:
    parts = []
    for directory in CODE_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            if path.is_file() and path.suffix != ".md" and "results" not in path.parts:
                try:
                    parts.append(path.read_text())
                except UnicodeDecodeError:
                    continue
    return "\n".join(parts)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def test_every_setting_has_a_row_in_operations_and_every_row_is_a_setting() -> None:
    settings_section = section(OPERATIONS.read_text(), "## Settings")
    documented = table_row_variables(settings_section)
    read = setting_variables()
    assert read - documented == set(), "settings the code reads but docs/operations.md lacks"
    assert documented - read == set(), "rows in docs/operations.md for settings nobody reads"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_triows_variable_a_page_names_is_named_in_the_code(page: Path) -> None:
    code = code_text()
    named = set(NAME.findall(page.read_text()))
    unknown = {name for name in named if name not in setting_variables() and name not in code}
    assert unknown == set(), f"{page.name} names variables the code never reads"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        checks_anchor = bool(anchor) and resolved.suffix == ".md"
        if not resolved.exists() or (checks_anchor and anchor not in anchors(resolved)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_renders_as_a_table(page: Path) -> None:
    """Each run of table rows starts with a header and a separator, with as many cells as it.

    Rows cut off from their header (by a paragraph between them) show on
    GitHub as raw pipes.
    """
    broken = []
    for table in re.findall(r"(?:^\|.*\n)+", FENCE.sub("", page.read_text()), re.MULTILINE):
        rows = table.splitlines()
        cells = [len(re.split(r"(?<!\\)\|", row.strip().strip("|"))) for row in rows]
        separator = len(rows) > 1 and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rows[1].strip())
        if not separator or len(set(cells)) != 1:
            broken.append(rows[0])
    assert broken == []


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
