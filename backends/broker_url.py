"""One parser for every broker URL and one way to open a (TLS) stream to a broker."""

from __future__ import annotations

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
    )


def query_int(address: BrokerAddress, name: str, default: int) -> int:
    """An integer URL parameter; :class:`SettingsError` if it is not one."""
    raw = address.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"TRIOWS_BROKER_URL has an invalid {name}: {raw!r}") from None


async def connect_stream(host: str, port: int, *, tls: bool) -> ByteStream:
    """A TCP (or verified TLS) stream to ``host:port``; the caller bounds the time.

    TLS uses the system's trust store and checks the host name. The protocols
    on top close their own sessions, so a peer that skips TLS close_notify is
    no truncation attack here. A certificate that fails verification raises
    :class:`BrokerRejected` (``tls``), not a retry-soon error.
    """
    if not tls:
        return await anyio.connect_tcp(host, port)
    try:
        return await anyio.connect_tcp(
            host, port, ssl_context=ssl.create_default_context(), tls_standard_compatible=False
        )
    except ssl.SSLCertVerificationError as error:
        raise BrokerRejected(
            "tls", f"TLS certificate verification failed for {host}:{port}: {error}"
        ) from error
