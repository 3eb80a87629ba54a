"""Who a client is: HS256 JWTs with a secret, or self-named users in dev mode."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from triows.protocol import InvalidInput, check_user_name

ALGORITHM = "HS256"
DEFAULT_TOKEN_TTL = 3600


class AuthError(Exception):
    """The credentials are missing, malformed, forged or expired; ``str()`` says which."""


@dataclass(frozen=True)
class Identity:
    """An authenticated user; ``expires_at`` (unix seconds) is None in dev mode."""

    user: str
    expires_at: float | None = None


def mint_token(secret: str, user: str, ttl: float = DEFAULT_TOKEN_TTL) -> str:
    """A token for ``user`` that expires ``ttl`` seconds from now."""
    check_user_name(user)
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + int(ttl)}, secret, ALGORITHM)


def verify_token(secret: str, token: str) -> Identity:
    """Check signature, algorithm (HS256 only) and expiry; return who it names."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("the token has expired") from None
    except jwt.InvalidTokenError as error:
        raise AuthError(f"invalid token: {error}") from None
    try:
        user = check_user_name(claims["sub"])
    except InvalidInput as error:
        raise AuthError(f"invalid token subject: {error}") from None
    return Identity(user, float(claims["exp"]))


def bearer_token(headers: Mapping[str, str], args: Mapping[str, str]) -> str | None:
    """The token from ``Authorization: Bearer`` or, for browsers' WebSockets, ``?token=``."""
    header = headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return args.get("token") or None


def identify(
    secret: str, headers: Mapping[str, str], args: Mapping[str, str], *, dev_user: str | None
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
    return verify_token(secret, token)
