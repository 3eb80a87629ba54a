"""One settings object for the whole server, read from ``TRIOWS_*`` and CLI flags.

Every bound the server keeps is a named setting here with a documented default.
Invalid values fail at start-up with one line that names the variable.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from triows.websecurity import check_allowed_host, check_allowed_origin

T = TypeVar("T")

DEFAULT_BROKER_URLS = {
    "amqp091": "amqp://guest:guest@127.0.0.1:5672/",
    "amqp10": "amqp://guest:guest@127.0.0.1:5672",
    "stomp": "stomp://guest:guest@127.0.0.1:61613",
}


MIN_SECRET_BYTES = 32
# Clock skew is seconds; a leeway of minutes would extend every token's life.
MAX_JWT_LEEWAY = 300
DEFAULT_PUBLISH_TIMEOUT = 10.0
QUEUE_TYPES = ("classic", "quorum")


class SettingsError(Exception):
    """A setting has an invalid value; the message names it and says why."""


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Settings:
    """Server settings; ``env`` is the environment variable each one is read from."""

    backend: str = field(default="memory", metadata={"env": "TRIOWS_BACKEND"})
    broker_url: str = field(default="", metadata={"env": "TRIOWS_BROKER_URL"})
    secret: str = field(default="", metadata={"env": "TRIOWS_SECRET"}, repr=False)
    insecure: bool = field(default=False, metadata={"env": "TRIOWS_INSECURE"})
    bind: tuple[str, ...] = field(default=("127.0.0.1:8000",), metadata={"env": "TRIOWS_BIND"})
    workers: int = field(default=1, metadata={"env": "TRIOWS_WORKERS"})
    instance_id: str = field(default="", metadata={"env": "TRIOWS_INSTANCE_ID"})
    max_message_bytes: int = field(default=65536, metadata={"env": "TRIOWS_MAX_MESSAGE_BYTES"})
    send_queue: int = field(default=256, metadata={"env": "TRIOWS_SEND_QUEUE"})
    max_connections: int = field(default=20000, metadata={"env": "TRIOWS_MAX_CONNECTIONS"})
    # File descriptors kept for all but connections (listeners, broker, HTTP
    # requests); TRIOWS_MAX_CONNECTIONS is lowered at start-up to fit under
    # the open-file limit with these to spare.
    open_files_reserve: int = field(default=32, metadata={"env": "TRIOWS_OPEN_FILES_RESERVE"})
    incoming_queue: int = field(default=1024, metadata={"env": "TRIOWS_INCOMING_QUEUE"})
    drain_timeout: float = field(default=10.0, metadata={"env": "TRIOWS_DRAIN_TIMEOUT"})
    close_timeout: float = field(default=5.0, metadata={"env": "TRIOWS_CLOSE_TIMEOUT"})
    publish_timeout: float = field(
        default=DEFAULT_PUBLISH_TIMEOUT, metadata={"env": "TRIOWS_PUBLISH_TIMEOUT"}
    )
    # 0: not set. Then it takes TRIOWS_PUBLISH_TIMEOUT's value, the old meaning
    # of that setting (it bounded every broker operation); deprecated, see
    # ``deprecations``, removed in the next release (then: 10 s).
    broker_timeout: float = field(default=0.0, metadata={"env": "TRIOWS_BROKER_TIMEOUT"})
    reconnect_max_delay: float = field(default=15.0, metadata={"env": "TRIOWS_RECONNECT_MAX"})
    retry_after: int = field(default=2, metadata={"env": "TRIOWS_RETRY_AFTER"})
    exchange: str = field(default="triows", metadata={"env": "TRIOWS_EXCHANGE"})
    prefetch: int = field(default=256, metadata={"env": "TRIOWS_PREFETCH"})
    heartbeat: int = field(default=30, metadata={"env": "TRIOWS_HEARTBEAT"})
    # AMQP 0-9-1 and STOMP on RabbitMQ: how long the broker keeps an
    # instance's queue (STOMP: a subscription's) once nothing consumes from
    # it (the x-expires argument), so that a reconnect finds what was
    # confirmed meanwhile.
    queue_expires: float = field(default=30.0, metadata={"env": "TRIOWS_QUEUE_EXPIRES"})
    address_template: str = field(default="", metadata={"env": "TRIOWS_ADDRESS_TEMPLATE"})
    log_level: str = field(default="INFO", metadata={"env": "TRIOWS_LOG_LEVEL"})
    jwt_leeway: float = field(default=5.0, metadata={"env": "TRIOWS_JWT_LEEWAY"})
    max_batch: int = field(default=100, metadata={"env": "TRIOWS_MAX_BATCH"})
    max_batch_bytes: int = field(default=1048576, metadata={"env": "TRIOWS_MAX_BATCH_BYTES"})
    # Seconds a POST /send body has to arrive whole, from the end of its head.
    body_timeout: float = field(default=10.0, metadata={"env": "TRIOWS_BODY_TIMEOUT"})
    send_rate: float = field(default=100.0, metadata={"env": "TRIOWS_SEND_RATE"})
    send_burst: int = field(default=50, metadata={"env": "TRIOWS_SEND_BURST"})
    # Structural tokens ('[', '{' and ',' outside strings) in one WebSocket frame
    # or one POST /send body, batch included: what parsing and checking JSON
    # costs grows with them, not with bytes. Counted before anything is parsed.
    max_json_tokens: int = field(default=4096, metadata={"env": "TRIOWS_MAX_JSON_TOKENS"})
    # A WebSocket frame counts against TRIOWS_SEND_RATE as one send plus one
    # per this many structural tokens: a costly frame slows its own sender.
    send_cost_tokens: int = field(default=64, metadata={"env": "TRIOWS_SEND_COST_TOKENS"})
    ping_interval: float = field(default=20.0, metadata={"env": "TRIOWS_PING_INTERVAL"})
    test_echo: bool = field(default=False, metadata={"env": "TRIOWS_TEST_ECHO"})
    # Rooms one connection may be in at once: each is a broker subscription at most.
    max_rooms: int = field(default=32, metadata={"env": "TRIOWS_MAX_ROOMS"})
    sse_heartbeat: float = field(default=15.0, metadata={"env": "TRIOWS_SSE_HEARTBEAT"})
    # Seconds a session outlives its connection, held at the broker for a
    # resume (the queue's x-expires); 0 turns sessions off.
    resume_window: float = field(default=120.0, metadata={"env": "TRIOWS_RESUME_WINDOW"})
    # What one session's queue may hold while its user is away; past either
    # bound the broker refuses new messages for it (the sender is told: full).
    session_max_messages: int = field(default=1000, metadata={"env": "TRIOWS_SESSION_MAX_MESSAGES"})
    session_max_bytes: int = field(default=1048576, metadata={"env": "TRIOWS_SESSION_MAX_BYTES"})
    # Deliveries a session's connection holds unacked (queued or being written);
    # at most half TRIOWS_SEND_QUEUE, so the broker never overflows a connection's queue.
    session_prefetch: int = field(default=64, metadata={"env": "TRIOWS_SESSION_PREFETCH"})
    # AMQP 0-9-1 on RabbitMQ: the type of session queues. "quorum" replicates
    # them over a cluster's nodes, so a node lost loses nothing they hold.
    queue_type: str = field(default="classic", metadata={"env": "TRIOWS_QUEUE_TYPE"})
    # Presence: how long a query waits for the other instances' answers, how
    # many users one answer lists, queries per second per user (HTTP and
    # WebSocket together, bursts of TRIOWS_PRESENCE_BURST), and whether rooms'
    # members get joined/left events.
    presence_timeout: float = field(default=1.0, metadata={"env": "TRIOWS_PRESENCE_TIMEOUT"})
    presence_max_users: int = field(default=1000, metadata={"env": "TRIOWS_PRESENCE_MAX_USERS"})
    presence_rate: float = field(default=5.0, metadata={"env": "TRIOWS_PRESENCE_RATE"})
    presence_burst: int = field(default=10, metadata={"env": "TRIOWS_PRESENCE_BURST"})
    presence_events: bool = field(default=True, metadata={"env": "TRIOWS_PRESENCE_EVENTS"})
    # Browser pages that may open /events besides the server's own ("*": any page).
    allowed_origins: tuple[str, ...] = field(default=(), metadata={"env": "TRIOWS_ALLOWED_ORIGINS"})
    # Host names served besides loopback ones: checked in dev mode, and whenever set.
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"env": "TRIOWS_ALLOWED_HOSTS"})

    def __post_init__(self) -> None:
        if not self.instance_id:
            object.__setattr__(self, "instance_id", default_instance_id())
        if not self.broker_url:
            object.__setattr__(self, "broker_url", DEFAULT_BROKER_URLS.get(self.backend, ""))
        for name in (
            "workers",
            "max_message_bytes",
            "send_queue",
            "max_connections",
            "open_files_reserve",
            "incoming_queue",
            "prefetch",
            "max_batch",
            "max_batch_bytes",
            "send_burst",
            "max_json_tokens",
            "send_cost_tokens",
            "max_rooms",
            "session_max_messages",
            "session_max_bytes",
            "session_prefetch",
            "presence_max_users",
            "presence_burst",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{_env(name)} must be at least 1, got {getattr(self, name)}")
        if self.broker_timeout < 0:
            raise SettingsError(
                f"TRIOWS_BROKER_TIMEOUT must be positive, got {self.broker_timeout}"
            )
        if not self.broker_timeout:
            object.__setattr__(self, "broker_timeout", self.publish_timeout)
            inherited = self.publish_timeout != DEFAULT_PUBLISH_TIMEOUT
            object.__setattr__(self, "_broker_timeout_inherited", inherited)
        for name in (
            "drain_timeout",
            "close_timeout",
            "body_timeout",
            "publish_timeout",
            "reconnect_max_delay",
            "queue_expires",
            "presence_timeout",
            "presence_rate",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.jwt_leeway <= MAX_JWT_LEEWAY:
            raise SettingsError(
                f"TRIOWS_JWT_LEEWAY must be 0-{MAX_JWT_LEEWAY} seconds, got {self.jwt_leeway}"
            )
        if self.resume_window < 0:
            raise SettingsError(
                f"TRIOWS_RESUME_WINDOW must not be negative (0 turns sessions off), "
                f"got {self.resume_window}"
            )
        # Half the connection's queue at most: frames of its own (acks, errors)
        # share it, and the broker's deliveries must never overflow it.
        object.__setattr__(
            self, "session_prefetch", min(self.session_prefetch, max(1, self.send_queue // 2))
        )
        if self.send_rate <= 0:
            raise SettingsError(f"TRIOWS_SEND_RATE must be positive, got {self.send_rate}")
        if self.ping_interval < 0:
            raise SettingsError(
                f"TRIOWS_PING_INTERVAL must not be negative (0 turns pings off), "
                f"got {self.ping_interval}"
            )
        if self.sse_heartbeat < 0:
            raise SettingsError(
                f"TRIOWS_SSE_HEARTBEAT must not be negative (0 turns it off), "
                f"got {self.sse_heartbeat}"
            )
        if self.heartbeat < 0 or self.retry_after < 0:
            raise SettingsError("TRIOWS_HEARTBEAT and TRIOWS_RETRY_AFTER must not be negative")
        if self.secret and len(self.secret.encode()) < MIN_SECRET_BYTES:
            # RFC 7518 §3.2: an HS256 key shorter than the hash is guessable.
            raise SettingsError(
                f"TRIOWS_SECRET must be at least {MIN_SECRET_BYTES} bytes for HS256 "
                f"(got {len(self.secret.encode())}); e.g. python3 -c "
                "'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if not self.bind:
            raise SettingsError("TRIOWS_BIND must name at least one address")
        for address in self.bind:
            _split_bind(address)
        if "{key}" not in self.address_template and self.address_template:
            raise SettingsError(
                f"TRIOWS_ADDRESS_TEMPLATE must contain '{{key}}', got {self.address_template!r}"
            )
        for name, check in (
            ("allowed_origins", check_allowed_origin),
            ("allowed_hosts", check_allowed_host),
        ):
            try:
                object.__setattr__(self, name, tuple(check(entry) for entry in getattr(self, name)))
            except ValueError as error:
                raise SettingsError(f"{_env(name)}: {error}") from None
        if self.queue_type not in QUEUE_TYPES:
            raise SettingsError(
                f"TRIOWS_QUEUE_TYPE must be {' or '.join(QUEUE_TYPES)}, got {self.queue_type!r}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(
                f"TRIOWS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )

    @property
    def deprecations(self) -> list[str]:
        """One line per deprecated use of a setting (logged once at start-up)."""
        if getattr(self, "_broker_timeout_inherited", False):
            return [
                f"TRIOWS_PUBLISH_TIMEOUT={self.publish_timeout} also bounds broker operations "
                "(connect, declare, bind, attach) because TRIOWS_BROKER_TIMEOUT is not set; "
                "from the next release it bounds confirms only: set TRIOWS_BROKER_TIMEOUT"
            ]
        return []

    @property
    def dev_mode(self) -> bool:
        """No secret: users name themselves with ``?user=`` (loopback only, or insecure)."""
        return not self.secret

    @property
    def binds_loopback_only(self) -> bool:
        return all(_is_loopback(_split_bind(address)[0]) for address in self.bind)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``TRIOWS_*`` from ``environ`` (default: the process environment).

        ``overrides`` (from CLI flags) win over the environment; ``None`` values are ignored.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f.metadata["env"], raw, _PARSERS[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _env(name: str) -> str:
    env: str = next(f.metadata["env"] for f in fields(Settings) if f.name == name)
    return env


def _parse(env: str, raw: str, parser: Callable[[str], T]) -> T:
    try:
        return parser(raw)
    except ValueError as error:
        raise SettingsError(f"{env}={raw!r} is invalid: {error}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _parse_binds(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_PARSERS_BY_TYPE: dict[str, Callable[[str], Any]] = {
    "bool": _parse_bool,
    "int": int,
    "float": float,
    "tuple[str, ...]": _parse_binds,
}
_PARSERS = {f.name: _PARSERS_BY_TYPE.get(str(f.type), str) for f in fields(Settings)}


def _split_bind(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SettingsError(f"bind address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address, or a name that resolves only to such.

    A name such as ``localhost`` is resolved rather than trusted: an
    ``/etc/hosts`` may map it to a routable address.
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        resolved = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).split("%")[0] for info in resolved}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
