"""Who a client is: HS256 JWTs with a secret, or self-named users in dev mode."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from triows.protocol import USER_NAME, InvalidInput, check_user_name

ALGORITHM = "HS256"
DEFAULT_TOKEN_TTL = 3600
# Seconds of clock skew allowed between the token's issuer and this instance
# for ``exp``, ``iat`` and ``nbf`` (``TRIOWS_JWT_LEEWAY``).
DEFAULT_LEEWAY = 5.0
# Entries a token's ``rooms`` claim may hold: each join or room send scans them.
MAX_ROOM_PATTERNS = 256


# The claims that are dates (RFC 7519 NumericDate: a JSON number of seconds).
NUMERIC_DATE_CLAIMS = ("exp", "iat", "nbf")


class AuthError(Exception):
    """The credentials are missing, malformed, forged or expired; ``str()`` says which."""


@dataclass(frozen=True)
class Identity:
    """An authenticated user; ``expires_at`` (unix seconds) is None in dev mode.

    ``rooms`` are the token's ``rooms`` claim: room names, or prefixes ending
    in ``*`` (``team-*``); None (dev mode) allows every room.
    """

    user: str
    expires_at: float | None = None
    rooms: tuple[str, ...] | None = None

    def may_use_room(self, room: str) -> bool:
        """Whether this identity may join ``room`` or send to it."""
        if self.rooms is None:
            return True
        return any(
            room.startswith(pattern[:-1]) if pattern.endswith("*") else room == pattern
            for pattern in self.rooms
        )


def check_room_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a room name, or a name prefix (possibly empty) then ``*``."""
    if isinstance(pattern, str):
        prefix = pattern[:-1] if pattern.endswith("*") else pattern
        if (not prefix and pattern == "*") or USER_NAME.fullmatch(prefix):
            return pattern
    raise InvalidInput(
        f"{pattern!r} is not a room name or a prefix of one followed by '*' (e.g. 'team-*')"
    )


def mint_token(
    secret: str, user: str, ttl: float = DEFAULT_TOKEN_TTL, rooms: tuple[str, ...] = ()
) -> str:
    """A token for ``user`` that expires ``ttl`` seconds from now and allows ``rooms``."""
    check_user_name(user)
    for pattern in rooms:
        check_room_pattern(pattern)
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if rooms:
        claims["rooms"] = list(rooms)
    return jwt.encode(claims, secret, ALGORITHM)


def verify_token(secret: str, token: str, leeway: float = DEFAULT_LEEWAY) -> Identity:
    """Check signature, algorithm (HS256 only) and expiry; return who it names.

    ``exp``, ``iat`` and ``nbf`` are checked with ``leeway`` seconds of clock
    skew. Any problem with the token, whatever the JWT library raises, is an
    :class:`AuthError` (a 401), never a server error.
    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp"]},
            leeway=leeway,
        )
        for name in NUMERIC_DATE_CLAIMS:
            # PyJWT takes a string of digits ("exp": "99999999999") for a date;
            # RFC 7519 says a JSON number.
            if name in claims and not _is_number(claims[name]):
                raise AuthError(f"invalid token: '{name}' is not a number")
        expires_at = float(claims["exp"])
        if not math.isfinite(expires_at):
            raise AuthError("invalid token: 'exp' is not a finite number")
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired") from None
    except jwt.InvalidTokenError as error:
        raise AuthError(f"invalid token: {error}") from None
    except AuthError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        # A validly signed token whose claims PyJWT cannot handle: exp=10**400
        # overflows its datetime arithmetic, a deep claim recurses.
        raise AuthError(f"invalid token: {error.__class__.__name__}") from None
    try:
        user = check_user_name(claims["sub"])
    except InvalidInput as error:
        raise AuthError(f"invalid token subject: {error}") from None
    rooms = claims.get("rooms", [])
    if not isinstance(rooms, list) or len(rooms) > MAX_ROOM_PATTERNS:
        raise AuthError(f"invalid token: 'rooms' must be a list of at most {MAX_ROOM_PATTERNS}")
    try:
        patterns = tuple(check_room_pattern(pattern) for pattern in rooms)
    except InvalidInput as error:
        raise AuthError(f"invalid token 'rooms': {error}") from None
    return Identity(user, expires_at, patterns)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bearer_token(headers: Mapping[str, str], args: Mapping[str, str]) -> str | None:
    """The token from ``Authorization: Bearer`` or, for browsers' WebSockets, ``?token=``."""
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return args.get("token") or None


def identify(
    secret: str,
    headers: Mapping[str, str],
    args: Mapping[str, str],
    *,
    dev_user: str | None,
    leeway: float = DEFAULT_LEEWAY,
) -> Identity:
    """Authenticate a request; in dev mode (no secret) trust ``dev_user``.

    Raises :class:`AuthError` for bad or missing credentials and
    :class:`InvalidInput` for an invalid dev-mode user name.
    """
    if not secret:
        if dev_user is None:
            raise AuthError("dev mode: name yourself with ?user=NAME")
        return Identity(check_user_name(dev_user))
    token = bearer_token(headers, args)
    if token is None:
        raise AuthError("missing credentials: send 'Authorization: Bearer <token>' or ?token=")
    return verify_token(secret, token, leeway)
