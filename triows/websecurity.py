"""What a browser may do with this server: which pages may open ``/events``, which names it serves.

A browser sends ``Origin`` on every WebSocket handshake and on a cross-site
``EventSource``, and lets any page open either to any server: the server has
to refuse a page of another site itself, or that page connects with the
visitor's dev-mode name or a token it got hold of. A client that is not a
browser sends no ``Origin`` and is not concerned.

DNS rebinding makes a page of another site same-origin with the server: the
attacker's name is re-pointed at 127.0.0.1, so the browser sends the
attacker's name as ``Host`` (and ``Origin``). Refusing a ``Host`` that is not
a name of this server stops it.

Pure functions over header values; :mod:`triows.app` and
:mod:`triows.dataplane` answer the refusals.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

# "*" in TRIOWS_ALLOWED_ORIGINS or TRIOWS_ALLOWED_HOSTS: anything passes.
ANY = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A script element without src (any type), and one with src.
_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\ssrc=)[^>]*>(.*?)</script>", re.DOTALL)
_SCRIPT_FILE = re.compile(r"<script[^>]*\ssrc=")
_INLINE_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def normalize_origin(origin: str) -> str | None:
    """``origin`` as ``scheme://host[:port]``, lower-cased, without a default port.

    None when it is not an http or https origin (``null``, a path, user info,
    a bad port): such an ``Origin`` matches nothing but ``*``.
    """
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not host
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def origin_allowed(headers: Iterable[tuple[bytes, bytes]], allowed: tuple[str, ...]) -> bool:
    """Whether a request's ``Origin`` may open ``/events``.

    Allowed: no ``Origin`` (not a browser), the server's own origin (its
    host and port are the request's ``Host``), one of ``allowed`` (normalized
    origins, see :func:`normalize_origin`), or anything if ``allowed`` holds
    ``*``.
    """
    origin = host = None
    for name, value in headers:
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    if origin is None or ANY in allowed:
        return True
    normalized = normalize_origin(origin)
    if normalized is None:
        return False
    if normalized in allowed:
        return True
    scheme = normalized.partition(":")[0]
    # The Host read with the Origin's scheme: behind a TLS-terminating proxy
    # the page is https while this server speaks http.
    return bool(host) and normalize_origin(f"{scheme}://{host}") == normalized


def host_name(host: str) -> str | None:
    """The name in a ``Host`` header, lower-cased, without port, brackets or trailing dot.

    None when the header is not a host with an optional port.
    """
    normalized = normalize_origin(f"http://{host}")
    if normalized is None:
        return None
    name = urlsplit(normalized).hostname
    return None if name is None else name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """``localhost``, a name under ``.localhost`` (RFC 6761), or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(headers: Iterable[tuple[bytes, bytes]], allowed: tuple[str, ...]) -> bool:
    """Whether the request's ``Host`` names this server: a loopback name, or one of ``allowed``.

    No ``Host`` at all (HTTP/1.0, or HTTP/2 without ``:authority``) passes:
    a browser always sends one.
    """
    if ANY in allowed:
        return True
    host = next((value for name, value in headers if name == b"host"), b"")
    return not host or _host_allowed(host, allowed)


@functools.lru_cache(maxsize=64)
def _host_allowed(host: bytes, allowed: tuple[str, ...]) -> bool:
    # Cached: in dev mode every request asks, nearly always with the same Host.
    name = host_name(host.decode("latin-1"))
    return name is not None and (is_loopback_name(name) or name in allowed)


def check_allowed_origin(entry: str) -> str:
    """A ``TRIOWS_ALLOWED_ORIGINS`` entry, normalized; ValueError if it is not an origin."""
    if entry == ANY:
        return entry
    normalized = normalize_origin(entry.lower())
    if normalized is None:
        raise ValueError(
            f"{entry!r} is not an origin: write scheme://host[:port] with http or https "
            "and no path, e.g. https://chat.example.com"
        )
    return normalized


def check_allowed_host(entry: str) -> str:
    """A ``TRIOWS_ALLOWED_HOSTS`` entry, normalized; ValueError if it is not a bare host name."""
    if entry == ANY:
        return entry
    name = host_name(entry.lower())
    if name is None or name != entry.lower().strip("[]").rstrip("."):
        raise ValueError(
            f"{entry!r} is not a host name: write the name alone, without scheme or port, "
            "e.g. chat.example.com"
        )
    return name


def page_headers(html: str) -> dict[str, str]:
    """The security headers of an HTML page whose scripts and styles are inline in ``html``.

    The Content-Security-Policy allows exactly the page's own ``<script>`` and
    ``<style>`` blocks (by their SHA-256), scripts from its own origin only if
    the page loads one (``<script src=...>``, the client module), connections
    to its own origin (``/events``; CSP's ``'self'`` covers ``ws:``/``wss:`` to
    it), images from its own origin (the favicon) and nothing else: no other
    script, no inline attribute, no plugin, no framing.
    """

    markup = _COMMENT.sub("", html)

    def sources(pattern: re.Pattern[str]) -> str:
        digests = {
            base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
            for block in pattern.findall(markup)
        }
        return " ".join(f"'sha256-{digest}'" for digest in sorted(digests)) or "'none'"

    script_sources = sources(_INLINE_SCRIPT)
    if _SCRIPT_FILE.search(markup):
        script_sources = "'self'" if script_sources == "'none'" else f"'self' {script_sources}"
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {script_sources}",
            f"style-src {sources(_INLINE_STYLE)}",
            "connect-src 'self'",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def static_file_headers() -> dict[str, str]:
    """The security headers of a file the pages load (the client module, the favicon).

    Never sniffed as another type, and not to be embedded by another site's
    page (``Cross-Origin-Resource-Policy``); triows sends no CORS headers, so a
    page of another origin serves its own copy of the module.
    """
    return {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
    }
