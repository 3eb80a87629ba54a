"""One parser for every broker URL (and URL list) and one way to open a (TLS) stream to one.

``TRIOWS_BROKER_URL`` is one URL or a comma-separated list of them, one per
node of a broker cluster: an instance connects to the first and, each time it
loses a node (or cannot reach it), tries the next one
(:class:`backends.supervisor.Supervised`). A comma inside a URL (in a
password) is written ``%2C``.

TLS (``amqps://``, ``stomp+ssl://``) verifies the broker's certificate and
host name, against the system's trust store or, with ``?cafile=PATH`` in the
URL, against the certificate authorities in that PEM file (the parameter
aiormq reads for ``amqp091``; the other backends read it here).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
from anyio.abc import ByteStream

from triows.backends.supervisor import BrokerRejected
from triows.settings import SettingsError


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker is and how to log in, parsed from ``TRIOWS_BROKER_URL``."""

    scheme: str
    host: str
    port: int
    tls: bool
    user: str | None
    password: str | None
    vhost: str
    query: Mapping[str, str] = field(default_factory=dict)
    # The URL as given (with its credentials: never logged).
    url: str = field(default="", repr=False)

    @property
    def cafile(self) -> str | None:
        """The PEM file of the certificate authorities TLS trusts (``?cafile=``), if set."""
        return self.query.get("cafile")

    def __str__(self) -> str:
        """The URL without credentials, for logs."""
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str, schemes: Mapping[str, tuple[int, bool]]) -> BrokerAddress:
    """Parse ``scheme://[user[:password]@]host[:port][/vhost][?k=v]``.

    ``schemes`` maps each accepted scheme to its default port and whether it
    means TLS. Raises :class:`SettingsError` naming what is wrong.
    """
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        accepted = " or ".join(f"{scheme}://" for scheme in schemes)
        raise SettingsError(f"TRIOWS_BROKER_URL {url!r} must start with {accepted}")
    default_port, tls = schemes[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError as error:
        raise SettingsError(f"TRIOWS_BROKER_URL {url!r} has an invalid port: {error}") from None
    path = unquote(parts.path)
    return BrokerAddress(
        scheme=parts.scheme,
        host=parts.hostname or "127.0.0.1",
        port=port,
        tls=tls,
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        vhost=path[1:] if len(path) > 1 else "/",
        query={name: values[-1] for name, values in parse_qs(parts.query).items()},
        url=url,
    )


def broker_urls(raw: str) -> list[str]:
    """The URLs of a comma-separated ``TRIOWS_BROKER_URL`` (one URL is a list of one)."""
    urls = [url.strip() for url in raw.split(",")]
    if not all(urls):
        raise SettingsError(f"TRIOWS_BROKER_URL {raw!r} has an empty entry in its list")
    return urls


def rotated_broker_urls(raw: str, first: int) -> str:
    """The URL list ``raw`` from its entry ``first`` (0-based, round the list) on.

    How instances on one cluster spread over its nodes: instance ``i`` gets the
    list rotated by ``i``, so each connects first to a different node and, on
    losing it, moves to the next.
    """
    urls = broker_urls(raw)
    first %= len(urls)
    return ",".join(urls[first:] + urls[:first])


def parse_broker_urls(raw: str, schemes: Mapping[str, tuple[int, bool]]) -> list[BrokerAddress]:
    """Parse every URL of ``raw``; :class:`SettingsError` names the first one that is wrong.

    A ``cafile`` that cannot be read is wrong too: no retry would fix it.
    """
    addresses = [parse_broker_url(url, schemes) for url in broker_urls(raw)]
    for address in addresses:
        if address.cafile is not None and not os.access(address.cafile, os.R_OK):
            raise SettingsError(
                f"TRIOWS_BROKER_URL {str(address)!r}: cannot read its cafile {address.cafile!r}"
            )
    return addresses


def query_int(address: BrokerAddress, name: str, default: int) -> int:
    """An integer URL parameter; :class:`SettingsError` if it is not one."""
    raw = address.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(
            f"TRIOWS_BROKER_URL {str(address)!r} has an invalid {name}: {raw!r}"
        ) from None


async def connect_stream(
    host: str, port: int, *, tls: bool, cafile: str | None = None
) -> ByteStream:
    """A TCP (or verified TLS) stream to ``host:port``; the caller bounds the time.

    TLS checks the host name and the certificate against the system's trust
    store, or against the authorities in ``cafile`` if given. The protocols
    on top close their own sessions, so a peer that skips TLS close_notify is
    no truncation attack here. A certificate that fails verification raises
    :class:`BrokerRejected` (``tls``), not a retry-soon error.
    """
    if not tls:
        return await anyio.connect_tcp(host, port)
    try:
        return await anyio.connect_tcp(
            host,
            port,
            ssl_context=tls_context(cafile),
            tls_standard_compatible=False,
        )
    except ssl.SSLCertVerificationError as error:
        raise BrokerRejected(
            "tls", f"TLS certificate verification failed for {host}:{port}: {error}"
        ) from error


def tls_context(cafile: str | None) -> ssl.SSLContext:
    """A client context that verifies certificates and host names (``cafile``: whom to trust).

    A ``cafile`` that cannot be read is a :class:`BrokerRejected` (``tls``):
    no retry soon will make it readable.
    """
    try:
        return ssl.create_default_context(cafile=cafile)
    except OSError as error:
        raise BrokerRejected("tls", f"cannot read the cafile {cafile}: {error}") from error
