"""JWT edges: any token problem is a 401, and clock skew within the leeway is allowed."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import serving
from triows.auth import AuthError, verify_token
from triows.settings import Settings, SettingsError

SECRET = "test-secret-" + "x" * 64


def signed(**claims: object) -> str:
    return jwt.encode({"sub": "Anne", **claims}, SECRET, "HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 10**400},
        {"exp": -(10**400)},
        {"exp": int(time.time()) + 60, "iat": 10**400},
        {"exp": int(time.time()) + 60, "nbf": 10**400},
        {"exp": "soon"},
        {"exp": int(time.time()) + 60, "sub": ["Anne"]},
        {"exp": str(int(time.time()) + 60)},
        {"exp": int(time.time()) + 60, "iat": str(int(time.time()))},
        {"exp": int(time.time()) + 60, "nbf": str(int(time.time()))},
    ],
    ids=[
        "huge-exp",
        "huge-negative-exp",
        "huge-iat",
        "huge-nbf",
        "string-exp",
        "list-sub",
        "digit-string-exp",
        "digit-string-iat",
        "digit-string-nbf",
    ],
)
def test_any_validly_signed_but_unusable_token_is_an_auth_error(claims: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        verify_token(SECRET, signed(**claims))


async def test_a_token_with_a_huge_exp_gets_401_not_500() -> None:
    async with serving(secret=SECRET) as client:
        response = await client.post(
            "/send",
            json={"to": "Bob", "message": "hi"},
            headers={"Authorization": f"Bearer {signed(exp=10**400)}"},
        )
        assert response.status_code == 401
        assert (await client.get("/readyz")).status_code == 200


def test_an_iat_two_seconds_ahead_is_within_the_default_leeway() -> None:
    now = int(time.time())
    identity = verify_token(SECRET, signed(iat=now + 2, nbf=now + 2, exp=now + 60))
    assert identity.user == "Anne"


def test_an_exp_just_past_is_within_the_leeway_and_beyond_it_is_expired() -> None:
    now = int(time.time())
    assert verify_token(SECRET, signed(exp=now - 2)).user == "Anne"
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, signed(exp=now - 2), leeway=0)
    with pytest.raises(AuthError, match="expired"):
        verify_token(SECRET, signed(exp=now - 60))


def test_jwt_leeway_setting_is_read_and_bounded() -> None:
    assert Settings().jwt_leeway == 5.0
    assert Settings.from_env({"TRIOWS_JWT_LEEWAY": "1.5"}).jwt_leeway == 1.5
    with pytest.raises(SettingsError, match="TRIOWS_JWT_LEEWAY"):
        Settings(jwt_leeway=-1)
    with pytest.raises(SettingsError, match="TRIOWS_JWT_LEEWAY"):
        Settings(jwt_leeway=3600)


async def test_the_leeway_setting_reaches_the_endpoints() -> None:
    token = signed(exp=int(time.time()) - 2)
    headers = {"Authorization": f"Bearer {token}"}
    body = {"to": "Bob", "message": "hi"}
    async with serving(secret=SECRET) as client:
        # Within the default leeway: authenticated (Bob is offline: 404).
        assert (await client.post("/send", json=body, headers=headers)).status_code == 404
    async with serving(secret=SECRET, jwt_leeway=0) as client:
        assert (await client.post("/send", json=body, headers=headers)).status_code == 401
