"""Who is online in a room, on the chat page in a real browser, against one ``triows serve``.

Headless Debian Chromium as in ``tests/test_browser.py``; the instance runs the
memory backend (presence across instances is tests/test_presence_instances.py).
Anne's page lists the members of ``#general`` (``#online``, filled by the
module's ``presence({room})`` and kept up to date by its presence events) while
Bob's pages come and go: leaving the room, Disconnect (close 1000) and closing
the tab (no close 1000: Bob's session waits the resume window, then he leaves).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, expect

from tests.test_browser import ARTIFACTS, Shots, held_in_a_thread, launch_chromium, open_page
from triows.process import serve_instance

# Seconds a closed tab's session waits before its user leaves the room.
RESUME_WINDOW = "1"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as browser:
        yield browser


def online(page: Page, room: str) -> Locator:
    return page.locator(f'#online li[data-room="{room}"]')


def shows_members(page: Page, room: str, *users: str) -> None:
    item = online(page, room)
    expect(item).to_have_attribute("data-users", " ".join(users))
    expect(item).to_have_text(f"online in #{room}: {', '.join(users)}")


def test_annes_page_lists_bob_while_he_is_in_the_room(browser: Browser) -> None:
    folder = ARTIFACTS / "test_annes_page_lists_bob_while_he_is_in_the_room"
    folder.mkdir(parents=True, exist_ok=True)
    shots = Shots(folder)
    errors: list[str] = []

    def note(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    env = {"TRIOWS_RESUME_WINDOW": RESUME_WINDOW}
    with held_in_a_thread(lambda _: serve_instance("memory", env=env)) as server:
        anne = open_page(browser, server.base_url, "Anne", ("general",))
        anne.on("console", note)
        shows_members(anne, "general", "Anne")

        bob = open_page(browser, server.base_url, "Bob", ("general",))
        shows_members(anne, "general", "Anne", "Bob")
        shows_members(bob, "general", "Anne", "Bob")
        shots.take(anne, "anne-sees-bob")

        bob.get_by_role("button", name="leave general").click()
        shows_members(anne, "general", "Anne")
        expect(online(bob, "general")).to_have_count(0)

        bob.locator("#room").fill("general")
        bob.locator("#join").click()
        shows_members(anne, "general", "Anne", "Bob")

        # Disconnect closes with 1000: the session ends, and Bob leaves at once.
        bob.locator("#disconnect").click()
        shows_members(anne, "general", "Anne")
        bob.context.close()

        # A closed tab sends no close 1000: Bob is held for the resume window, then leaves.
        bob = open_page(browser, server.base_url, "Bob", ("general",))
        shows_members(anne, "general", "Anne", "Bob")
        bob.context.close()
        shows_members(anne, "general", "Anne")
        shots.take(anne, "anne-alone-again")
        anne.context.close()
    assert errors == []
    print(f"browser test screenshots: {folder}")
