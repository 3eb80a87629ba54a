"""Origins, Host names and the page's policy as pure functions, and the settings that list them."""

from __future__ import annotations

import base64
import hashlib

import pytest

from tests.test_client_chat_page import PAGE, outline
from triows.settings import Settings, SettingsError
from triows.websecurity import host_allowed, normalize_origin, origin_allowed, page_headers


@pytest.mark.parametrize(
    ("origin", "normalized"),
    [
        ("https://Chat.Example.com", "https://chat.example.com"),
        ("https://chat.example.com:443", "https://chat.example.com"),
        ("http://chat.example.com:80", "http://chat.example.com"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("null", None),
        ("file://", None),
        ("https://chat.example.com/", None),
        ("https://a@chat.example.com", None),
        ("https://chat.example.com:99999", None),
        ("https://[::1", None),
    ],
)
def test_an_origin_is_normalized_or_matches_nothing(origin: str, normalized: str | None) -> None:
    assert normalize_origin(origin) == normalized


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in values.items()]


def test_the_servers_own_origin_is_its_host_under_either_scheme() -> None:
    host = "chat.example.com:8443"
    for origin in ("http://chat.example.com:8443", "https://chat.example.com:8443"):
        assert origin_allowed(headers(origin=origin, host=host), ())
    assert origin_allowed(
        headers(origin="https://chat.example.com", host="chat.example.com:443"), ()
    )
    assert not origin_allowed(
        headers(origin="https://chat.example.com", host="chat.example.com:8443"), ()
    )
    assert not origin_allowed(headers(origin="https://chat.example.com"), ())
    assert origin_allowed(headers(host=host), ())


def test_a_host_is_allowed_when_loopback_or_listed() -> None:
    for host in ("localhost:8000", "app.localhost", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert host_allowed(headers(host=host), ()), host
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "[::1"):
        assert not host_allowed(headers(host=host), ()), host
    assert host_allowed(headers(host="chat.example.com:8000"), ("chat.example.com",))
    assert host_allowed(headers(host="evil.example"), ("*",))
    assert host_allowed([], ())


def test_listed_origins_and_hosts_are_normalized_and_a_bad_entry_names_the_setting() -> None:
    settings = Settings.from_env(
        {
            "TRIOWS_ALLOWED_ORIGINS": "https://Chat.example.com:443, *",
            "TRIOWS_ALLOWED_HOSTS": "Chat.Example.com, [::1]",
        }
    )
    assert settings.allowed_origins == ("https://chat.example.com", "*")
    assert settings.allowed_hosts == ("chat.example.com", "::1")
    for name, value in (
        ("TRIOWS_ALLOWED_ORIGINS", "chat.example.com"),
        ("TRIOWS_ALLOWED_ORIGINS", "https://chat.example.com/app"),
        ("TRIOWS_ALLOWED_HOSTS", "chat.example.com:8000"),
        ("TRIOWS_ALLOWED_HOSTS", "https://chat.example.com"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


def test_the_page_policy_allows_exactly_the_pages_own_script_and_its_origins_module() -> None:
    (script,) = outline(PAGE.read_text()).scripts
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = page_headers(PAGE.read_text())["Content-Security-Policy"]
    assert f"script-src 'self' 'sha256-{digest}';" in policy


def test_a_page_that_loads_no_script_file_gets_no_self_in_its_script_policy() -> None:
    inline_only = page_headers("<script>run()</script>")["Content-Security-Policy"]
    assert "script-src 'sha256-" in inline_only
    assert "'self'" not in inline_only.split("script-src", 1)[1].split(";", 1)[0]
    file_only = page_headers('<script type="module" src="/triows.js"></script>')
    assert "script-src 'self';" in file_only["Content-Security-Policy"]
