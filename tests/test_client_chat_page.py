"""The chat page at ``/``: the hooks its header promises exist, and its script parses.

A real browser drives the page elsewhere (tests/test_browser.py); these
checks need none and keep the documented ids from drifting.
"""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

from tests.conftest import serving
from triows.client import RECONNECT_CLOSE_CODES
from triows.cluster import debian_executable

STATIC = Path(__file__).resolve().parent.parent / "triows" / "static"
PAGE = STATIC / "chat.html"
MODULE = STATIC / "triows.js"


class PageOutline(HTMLParser):
    """Ids, labels, form controls and inline scripts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.labelled: set[str] = set()
        self.controls: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.append(str(attributes["id"]))
        if tag == "label" and attributes.get("for"):
            self.labelled.add(str(attributes["for"]))
        if tag in ("input", "select", "textarea"):
            self.controls.append(str(attributes.get("id")))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def outline(html: str) -> PageOutline:
    parser = PageOutline()
    parser.feed(html)
    return parser


def documented_ids(html: str) -> set[str]:
    header = html.split("<html", 1)[0]
    # "#general" is the example room name, not an id.
    return set(re.findall(r"#([a-z][a-z-]*)\b", header)) - {"general"}


async def test_the_page_is_served_at_the_root() -> None:
    async with serving() as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert (await response.get_data(as_text=True)) == PAGE.read_text()


def test_every_id_the_header_documents_is_on_the_page_once() -> None:
    html = PAGE.read_text()
    page = outline(html)
    documented = documented_ids(html)
    assert {"login", "user", "token", "state", "instance", "rooms", "room-list", "send", "log"} <= (
        documented
    )
    assert documented <= set(page.ids)
    assert len(page.ids) == len(set(page.ids)), "an id is used twice"


def test_every_form_control_has_a_label() -> None:
    page = outline(PAGE.read_text())
    assert page.controls
    assert set(page.controls) <= page.labelled


def test_the_page_script_and_the_client_module_parse_as_modules(tmp_path: Path) -> None:
    (script,) = outline(PAGE.read_text()).scripts
    (tmp_path / "chat.mjs").write_text(script)
    (tmp_path / "triows.mjs").write_text(MODULE.read_text())
    node = debian_executable("node", "nodejs")
    for name in ("chat.mjs", "triows.mjs"):
        result = subprocess.run(
            [node, "--check", str(tmp_path / name)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr


def test_the_client_module_reconnects_on_the_codes_the_python_client_does() -> None:
    match = re.search(r"RECONNECT_CODES = Object.freeze\(\[([\d, ]+)\]\)", MODULE.read_text())
    assert match is not None
    module_codes = {int(code) for code in match.group(1).split(",")}
    assert module_codes == RECONNECT_CLOSE_CODES


async def test_the_client_module_is_served_as_javascript_with_security_headers() -> None:
    async with serving() as client:
        response = await client.get("/triows.js")
        assert response.status_code == 200
        assert response.mimetype == "text/javascript"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert (await response.get_data(as_text=True)) == MODULE.read_text()


async def test_the_favicon_is_served_so_a_browser_gets_no_404() -> None:
    async with serving() as client:
        for path in ("/favicon.ico", "/favicon.svg"):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.mimetype == "image/svg+xml"
