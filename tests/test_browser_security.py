"""The chat page and a page of another site in a real browser, against one ``triows serve``.

Headless Chromium as in ``tests/test_browser.py``. The page must work under
its own Content-Security-Policy, and a page of another site
(``http://evil.example``, answered by Playwright's router; its script then
opens a real WebSocket to the instance) must not read anyone's frames.

Chromium's Local Network Access checks are turned off here: they stop a
public page from reaching a loopback server, but not one server on the
internet from another's page (nor do other browsers all have them), which is
what these tests stand for. A cross-site ``EventSource`` needs CORS, which
triows never grants; the server's refusal of it is tested over raw sockets.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from urllib.parse import urlencode

import pytest
import trio
from playwright.sync_api import Browser, ConsoleMessage, Route, expect

from tests.test_browser import launch_chromium
from triows.process import serve_instance

# Hang guard only (seconds).
START_TIMEOUT = 60
EVIL_PAGE = "http://evil.example/"
WITHOUT_LOCAL_NETWORK_CHECKS = (
    "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium(WITHOUT_LOCAL_NETWORK_CHECKS) as browser:
        yield browser


@contextmanager
def instance_in_a_thread(
    env: Mapping[str, str] | None = None, port: int | None = None
) -> Iterator[str]:
    """A ``triows serve`` (memory) held by a Trio run in a thread of its own; yields its URL.

    On leaving, the instance gets SIGTERM: it drains, closing sockets with 1012.
    """
    handed: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.Event] | BaseException]
    handed = queue.Queue()

    async def hold() -> None:
        try:
            async with serve_instance(env=env, port=port) as instance:
                stop = trio.Event()
                handed.put((instance.base_url, trio.lowlevel.current_trio_token(), stop))
                await stop.wait()
        except BaseException as error:  # handed to the test's thread, raised there
            handed.put(error)

    thread = threading.Thread(target=trio.run, args=(hold,), name="instance", daemon=True)
    thread.start()
    got = handed.get(timeout=START_TIMEOUT)
    if isinstance(got, BaseException):
        thread.join()
        raise got
    url, token, stop = got
    try:
        yield url
    finally:
        with suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(START_TIMEOUT)


def test_the_chat_page_works_under_its_content_security_policy(browser: Browser) -> None:
    violations: list[str] = []

    def note(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    with instance_in_a_thread() as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.on("console", note)
            page.goto(f"{url}/?{urlencode({'user': 'Anne', 'autoconnect': '1'})}")
            expect(page.locator("#state")).to_have_attribute("data-state", "connected")
            page.locator("#to").fill("Anne")
            page.locator("#text").fill("note to self")
            page.locator("#send-button").click()
            # The module (/triows.js, a script of the page's own origin) ran: the
            # note came back and marked the page's own entry delivered.
            sent = page.locator('#log .entry[data-kind="sent"][data-delivered="true"]')
            expect(sent).to_contain_text("note to self")
            # The page's own stylesheet applies (its hash is in the policy).
            label = page.locator('label[for="text"]')
            assert label.evaluate("element => getComputedStyle(element).flexGrow") == "1"
        finally:
            context.close()
    assert violations == []


def test_the_chat_page_loads_without_a_failed_request_or_a_console_error(
    browser: Browser,
) -> None:
    errors: list[str] = []
    failed: list[str] = []
    with instance_in_a_thread() as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.goto(f"{url}/?{urlencode({'user': 'Anne', 'autoconnect': '1'})}")
            expect(page.locator("#state")).to_have_attribute("data-state", "connected")
            # The icon is asked for once the page has loaded; wait for its answer.
            page.wait_for_load_state("networkidle")
        finally:
            context.close()
    assert failed == []
    assert errors == []


def test_the_sender_sees_its_own_room_message_once(browser: Browser) -> None:
    with instance_in_a_thread() as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            query = urlencode({"user": "Anne", "autoconnect": "1", "room": "general"})
            page.goto(f"{url}/?{query}")
            joined = page.locator('#room-list li[data-room="general"][data-state="joined"]')
            expect(joined).to_have_count(1)
            for text in ("first", "second"):
                page.locator("#to").fill("#general")
                page.locator("#text").fill(f"{text} to general")
                page.locator("#send-button").click()
                sent = page.locator(
                    '#log .entry[data-kind="sent"][data-room="general"][data-delivered="true"]',
                    has_text=f"{text} to general",
                )
                # Acked (the status in the text) and delivered back: one entry.
                expect(sent).to_contain_text("(routed)")
            expect(page.locator("#log .entry", has_text="to general")).to_have_count(2)
            expect(page.locator('#log .entry[data-kind="message"]')).to_have_count(0)
        finally:
            context.close()


# What the page of another site does: connect as Bob, and say what it got.
EVIL_SCRIPT = """
const ws = new WebSocket("%s/events?user=Bob");
ws.onmessage = (event) => { document.body.dataset.got ||= "read: " + event.data; };
ws.onclose = () => { document.body.dataset.got ||= "refused"; };
"""


@pytest.mark.parametrize(
    ("allowed", "outcome"),
    [("", "^refused$"), (EVIL_PAGE.rstrip("/"), '^read: {"type":"hello"')],
    ids=["by-default", "when-listed"],
)
def test_a_page_of_another_site_reads_bobs_frames_only_when_its_origin_is_allowed(
    browser: Browser,
    allowed: str,
    outcome: str,
) -> None:
    with instance_in_a_thread(env={"TRIOWS_ALLOWED_ORIGINS": allowed}) as url:
        script = EVIL_SCRIPT % url.replace("http://", "ws://", 1)
        html = f"<!doctype html><body><script>{script}</script></body>"

        def serve_evil_page(route: Route) -> None:
            route.fulfill(status=200, content_type="text/html", body=html)

        context = browser.new_context()
        try:
            page = context.new_page()
            page.route(EVIL_PAGE, serve_evil_page)
            page.goto(EVIL_PAGE)
            expect(page.locator("body")).to_have_attribute("data-got", re.compile(outcome))
        finally:
            context.close()
