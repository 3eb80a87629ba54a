"""The browser client module (``/triows.js``) in a real browser, through the guide's example page.

The example page is the ``html`` block of docs/client.md, as a reader would
save it: the test serves it at ``<instance>/example.html`` (Playwright answers
that one URL, so the page is same-origin with the instance) and everything
else, ``/triows.js`` and the ``/events`` WebSocket, comes from a real
``triows serve``. Headless Debian Chromium as in ``tests/test_browser.py``,
with its Local Network Access checks off: a document Playwright answers has
no address of its own, so Chromium takes it for a public page reaching a
loopback server and blocks its WebSocket.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, Route, expect

from tests.test_browser import launch_chromium
from tests.test_browser_security import WITHOUT_LOCAL_NETWORK_CHECKS, instance_in_a_thread
from triows.process import free_port

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def example_page_html() -> str:
    """The one ``html`` block of the guide's "Browser" section."""
    browser_section = GUIDE.read_text().split("\n## Browser\n", 1)[1]
    (html,) = re.findall(r"```html\n(.*?)```", browser_section, re.DOTALL)
    return html


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium(WITHOUT_LOCAL_NETWORK_CHECKS) as browser:
        yield browser


def open_example(browser: Browser, url: str, user: str) -> Page:
    """The example page as ``user``, connected and in room ``general``."""
    html = example_page_html()

    def serve_example(route: Route) -> None:
        route.fulfill(status=200, content_type="text/html", body=html)

    page = browser.new_context().new_page()
    page.route(f"{url}/example.html?*", serve_example)
    page.goto(f"{url}/example.html?user={user}")
    expect(logged(page, "joined #general")).to_have_count(1)
    expect(page.locator("#state")).to_have_text("connected")
    return page


def logged(page: Page, text: str) -> Locator:
    return page.locator("#log li", has_text=text)


def send(page: Page, to: str, text: str) -> None:
    page.locator("#to").fill(to)
    page.locator("#text").fill(text)
    page.locator("#send button").click()


def test_the_guides_example_page_exchanges_messages_with_acks(browser: Browser) -> None:
    with instance_in_a_thread() as url:
        anne = open_example(browser, url, "Anne")
        expect(logged(anne, "online in #general: Anne")).to_have_count(1)
        bob = open_example(browser, url, "Bob")
        # Who is in the room (presence({room})), and who came since (presence events).
        expect(logged(bob, "online in #general: Anne, Bob")).to_have_count(1)
        expect(logged(anne, "Bob arrived in #general")).to_have_count(1)
        send(anne, "Bob", "hi Bob")
        # The send's promise resolved with the ack: its status is in the log.
        expect(logged(anne, "me to Bob: hi Bob (routed)")).to_have_count(1)
        expect(logged(bob, "Anne: hi Bob")).to_have_count(1)

        send(bob, "#general", "hello general")
        expect(logged(bob, "me to #general: hello general (routed)")).to_have_count(1)
        expect(logged(anne, "Bob in #general: hello general")).to_have_count(1)
        # Bob's socket had his own room message back before this later one.
        send(anne, "Bob", "after the room message")
        expect(logged(bob, "Anne: after the room message")).to_have_count(1)
        expect(logged(bob, "hello general")).to_have_count(1)

        # An error frame rejects the send's promise with its code.
        send(anne, "Nobody", "anyone there?")
        expect(logged(anne, "not sent to Nobody: offline:")).to_have_count(1)
        for page in (anne, bob):
            page.context.close()


def test_the_example_page_reconnects_after_a_drain_to_the_restarted_instance(
    browser: Browser,
) -> None:
    port = free_port()
    with instance_in_a_thread(env={"TRIOWS_INSTANCE_ID": "before"}, port=port) as url:
        anne, bob = open_example(browser, url, "Anne"), open_example(browser, url, "Bob")
        send(anne, "#general", "before the drain")
        expect(logged(bob, "Anne in #general: before the drain")).to_have_count(1)
    # Left: the instance got SIGTERM and drained, closing both sockets with 1012.
    for page in (anne, bob):
        expect(logged(page, "lost the connection").first).to_contain_text("(1012 ")
    with instance_in_a_thread(env={"TRIOWS_INSTANCE_ID": "after"}, port=port) as again:
        assert again == url
        for page in (anne, bob):
            expect(logged(page, "reconnected to after (was before)")).to_have_count(1)
            expect(logged(page, "re-joined #general")).to_have_count(1)
            expect(page.locator("#state")).to_have_text("connected")
        send(anne, "#general", "after the restart")
        expect(logged(anne, "me to #general: after the restart (routed)")).to_have_count(1)
        expect(logged(bob, "Anne in #general: after the restart")).to_have_count(1)
        send(bob, "Anne", "direct, after the restart")
        expect(logged(anne, "Bob: direct, after the restart")).to_have_count(1)
        for page in (anne, bob):
            page.context.close()
